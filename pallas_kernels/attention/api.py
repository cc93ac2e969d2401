"""The one attention entry point used by the models.

Implementations: ``reference`` (dense jnp), ``xla_chunked`` (blockwise, O(L) memory, every backend),
``pallas_gpu`` (our flash-attention Pallas kernels, Triton lowering), ``splash_tpu`` (jax's splash attention),
``cudnn`` (``jax.nn.dot_product_attention``), and ``pallas_gpu_interpret`` / ``splash_tpu_interpret``, the two
Pallas kernels run by the interpreter (CPU; tests). ``implementation=None`` (or "auto") takes
:func:`automatic_implementation` for the backend.

On a mesh, the Pallas kernels run per device inside ``shard_map`` (``pallas_kernels/sharding.py``): rows split
over (``data``, ``fsdp``), heads over ``tensor`` when it divides both the query and the kv heads.

Attention sinks (``sinks=``, one logit per query head, gpt-oss) are computed by ``reference`` and ``xla_chunked``
(the automatic choice takes ``xla_chunked`` for them on accelerators); the other implementations refuse them.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels import choices, dispatch
from pallas_kernels import sharding as kernel_sharding
from pallas_kernels.attention.reference import attention_reference

IMPLEMENTATIONS = choices.ATTENTION
SINK_IMPLEMENTATIONS = ("reference", "xla_chunked")
# On the CPU the blockwise loop (128-blocks, skipping masked ones) beat the dense reference from L = 256 on
# packed rows (benchmarks/bench_kernels.py); below, one block is the whole row and the reference is simpler.
CPU_CHUNKED_MIN_LENGTH = 256


def _validate(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention: expected q [B,L,Hq,D] and k, v [B,L,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {q.shape} and k/v {k.shape} differ in batch, length or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {k.shape[2]} kv heads do not divide {q.shape[2]} query heads")
    if segment_ids.shape != q.shape[:2]:
        raise ValueError(f"attention: segment_ids shape {segment_ids.shape} does not match q's [B, L] {q.shape[:2]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"attention: {name} must be a floating-point array, got dtype {x.dtype}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"attention: segment_ids must be integers, got dtype {segment_ids.dtype}")


def automatic_implementation(backend: str, length: int) -> tuple[str, str]:
    """(implementation, reason) that ``implementation=None`` picks on ``backend`` ('cpu', 'gpu', 'tpu') for rows of
    ``length`` tokens; ``sftjax plan`` asks this for a target it is not running on."""
    if backend == "tpu":
        return "splash_tpu", "tpu backend"
    if backend == "gpu":
        # pallas_gpu is tested in interpret mode only; until scripts/bench_gpu.sh has verified it on a real GPU
        # (correctness and speed), the automatic choice is the XLA blockwise version. Opt in with
        # implementation="pallas_gpu" (model.attention_implementation: pallas_gpu).
        return "xla_chunked", "gpu backend (pallas_gpu not yet verified on hardware)"
    if length >= CPU_CHUNKED_MIN_LENGTH:
        return "xla_chunked", f"{backend} backend, length >= {CPU_CHUNKED_MIN_LENGTH}"
    return "reference", f"{backend} backend, length < {CPU_CHUNKED_MIN_LENGTH}"


def automatic_sink_implementation(backend: str, length: int) -> tuple[str, str]:
    """The automatic choice when the attention has sinks: the CPU's choice, ``xla_chunked`` elsewhere."""
    if backend in ("gpu", "tpu"):
        return "xla_chunked", f"{backend} backend, attention sinks"
    return automatic_implementation(backend, length)


def attention(q, k, v, segment_ids, *, causal=True, sliding_window=None, logit_softcap=None, scale=None,
              sinks=None, implementation=None):
    """Causal, segment-block-diagonal attention with GQA.

    q: [B, L, Hq, D]; k, v: [B, L, Hkv, D] (Hkv divides Hq); segment_ids: [B, L] int (0 = padding).
    Token i attends to token j only if they share a segment id, j <= i (causal) and i - j < sliding_window.
    sinks: optional [Hq] sink logits (see :func:`pallas_kernels.attention.reference.attention_reference`).
    Returns [B, L, Hq, D] in q's dtype.
    """
    _validate(q, k, v, segment_ids)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"attention: sliding_window must be >= 1, got {sliding_window}")
    if sinks is not None and sinks.shape != (q.shape[2],):
        raise ValueError(f"attention: sinks must have one logit per query head, shape ({q.shape[2]},); "
                         f"got {sinks.shape}")
    automatic = automatic_implementation if sinks is None else automatic_sink_implementation
    name = dispatch.resolve("attention", implementation, IMPLEMENTATIONS,
                            lambda: automatic(dispatch.backend(), q.shape[1]))
    options = dict(causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale)
    if sinks is not None and name not in SINK_IMPLEMENTATIONS:
        raise ValueError(f"attention: implementation {name!r} does not support attention sinks; use one of "
                         f"{', '.join(SINK_IMPLEMENTATIONS)} (model.attention_implementation)")
    if name == "reference":
        return attention_reference(q, k, v, segment_ids, sinks=sinks, **options)
    if name == "xla_chunked":
        from pallas_kernels.attention.xla_chunked import attention_xla_chunked

        return attention_xla_chunked(q, k, v, segment_ids, sinks=sinks, **options)
    if name.startswith(("pallas_gpu", "splash_tpu")):
        return _pallas_per_device(_pallas_kernel(name, options), q, k, v, segment_ids)
    from pallas_kernels.attention.cudnn import attention_cudnn

    return attention_cudnn(q, k, v, segment_ids, **options)


def _pallas_kernel(name, options):
    interpret = name.endswith("interpret")
    if name.startswith("pallas_gpu"):
        from pallas_kernels.attention.pallas_gpu import attention_pallas_gpu

        return functools.partial(attention_pallas_gpu, interpret=interpret, **options)
    from pallas_kernels.attention import splash_tpu

    return functools.partial(splash_tpu.attention_splash_tpu, interpret=interpret, **options)


def _pallas_per_device(kernel, q, k, v, segment_ids):
    """``kernel`` on each device's rows and heads when the inputs live on a mesh; a plain call otherwise.

    Rows are independent and so are heads (a kv head serves the same contiguous block of query heads on every
    device when ``tensor`` divides both head counts), so the per-device results are exactly slices of the whole.
    """
    mesh = kernel_sharding.find_mesh(q, k, v, segment_ids)
    if mesh is None:
        return kernel(q, k, v, segment_ids)
    rows = kernel_sharding.split_axes(mesh, q.shape[0], kernel_sharding.ROW_AXES)
    heads = kernel_sharding.split_axes(mesh, math.gcd(q.shape[2], k.shape[2]), (kernel_sharding.HEAD_AXIS,),
                                       taken=rows)
    if not rows and not heads:
        return kernel(q, k, v, segment_ids)
    row_entry, head_entry = kernel_sharding.spec_entry(rows), kernel_sharding.spec_entry(heads)
    heads_spec = PartitionSpec(row_entry, None, head_entry, None)
    return kernel_sharding.run_per_device(kernel, mesh, (heads_spec, heads_spec, heads_spec,
                                                         PartitionSpec(row_entry, None)), heads_spec,
                                          q, k, v, segment_ids)
