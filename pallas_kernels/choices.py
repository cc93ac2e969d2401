"""The names of the kernel implementations, importable without jax (configs validate against them at load time).

``auto`` (or ``None``) asks each op's ``api.py`` for the best implementation on the backend at hand.
"""

AUTO = "auto"
ATTENTION = ("reference", "xla_chunked", "pallas_gpu", "pallas_gpu_interpret", "splash_tpu", "splash_tpu_interpret",
             "cudnn")
CROSS_ENTROPY = ("reference", "xla_chunked", "pallas_gpu", "pallas_gpu_interpret", "pallas_tpu",
                 "pallas_tpu_interpret")


def explicit(name: str | None) -> str | None:
    """None for the automatic choice ("auto" or None), else the name itself."""
    return None if name in (None, AUTO) else name
