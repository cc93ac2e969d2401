"""The one entry point for the vocabulary projection and the training loss.

Implementations of the fused loss: ``reference`` (materializes the logits), ``xla_chunked`` (token x vocabulary
tiles in XLA, every backend), ``pallas_gpu`` / ``pallas_tpu`` (XLA matmuls per token block + Pallas row
kernels for the softmax work), and ``pallas_gpu_interpret`` / ``pallas_tpu_interpret`` (the same kernels run
by the interpreter on the CPU; tests). ``implementation=None`` uses the configured default
(:func:`pallas_kernels.set_default_implementation("cross_entropy", name)`), else the best for the backend.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.cross_entropy.reference import (
    CrossEntropyResult,
    fused_linear_cross_entropy_reference,
    project_logits_reference,
)

IMPLEMENTATIONS = ("reference", "xla_chunked", "pallas_gpu", "pallas_gpu_interpret", "pallas_tpu",
                   "pallas_tpu_interpret")
# Below this many logits (tokens x vocab) the reference is cheap enough that chunking only adds loop overhead.
CHUNKED_MIN_LOGITS = 1 << 22


def project_logits(hidden, weight, *, logit_softcap=None):
    """hidden [..., D] @ weight [D, V] -> float32 logits [..., V] (used for inference/eval logits)."""
    return project_logits_reference(hidden, weight, logit_softcap=logit_softcap)


def _validate(hidden, weight, targets, loss_mask):
    if weight.ndim != 2 or hidden.shape[-1] != weight.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: hidden dim {hidden.shape[-1]} != weight rows "
                         f"{weight.shape[0] if weight.ndim else weight.shape} (weight must be [D, V])")
    if targets.shape != hidden.shape[:-1] or loss_mask.shape != targets.shape:
        raise ValueError(f"fused_linear_cross_entropy: targets {targets.shape} / loss_mask {loss_mask.shape} "
                         f"must match hidden's leading shape {hidden.shape[:-1]}")
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"fused_linear_cross_entropy: {name} must be floating-point, got dtype {x.dtype}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"fused_linear_cross_entropy: targets must be integers, got dtype {targets.dtype}")


def _automatic(num_logits):
    backend = dispatch.backend()
    if num_logits < CHUNKED_MIN_LOGITS:
        return "reference", f"{backend} backend, fewer than {CHUNKED_MIN_LOGITS} logits"
    # On GPU too: the XLA version needs no Triton lowering, and the Pallas row kernels have not yet been
    # measured ahead of it on a GPU (benchmarks/bench_kernels.py records both).
    return "xla_chunked", f"{backend} backend"


def fused_linear_cross_entropy(hidden, weight, targets, loss_mask, *, logit_softcap=None, z_loss=0.0,
                               implementation=None) -> CrossEntropyResult:
    """Summed masked cross-entropy of ``hidden @ weight`` against ``targets``.

    hidden: [..., D]; weight: [D, V]; targets, loss_mask: [...]. Returns float32 (loss_sum, token_count,
    correct_count) summed over tokens where loss_mask is nonzero.
    """
    _validate(hidden, weight, targets, loss_mask)
    num_tokens = 1
    for size in targets.shape:
        num_tokens *= size
    name = dispatch.resolve("cross_entropy", implementation, IMPLEMENTATIONS,
                            lambda: _automatic(num_tokens * weight.shape[1]))
    options = dict(logit_softcap=logit_softcap, z_loss=z_loss)
    if name == "reference":
        return fused_linear_cross_entropy_reference(hidden, weight, targets, loss_mask, **options)
    if name == "xla_chunked":
        from pallas_kernels.cross_entropy.xla_chunked import fused_linear_cross_entropy_xla_chunked

        return fused_linear_cross_entropy_xla_chunked(hidden, weight, targets, loss_mask, **options)
    from pallas_kernels.cross_entropy.pallas_rows import fused_linear_cross_entropy_pallas

    platform = "gpu" if name.startswith("pallas_gpu") else "tpu"
    interpret = name.endswith("interpret")
    block_rows = 8 if platform == "tpu" else 16
    return fused_linear_cross_entropy_pallas(hidden, weight, targets, loss_mask, platform=platform,
                                             interpret=interpret, block_rows=block_rows, **options)
