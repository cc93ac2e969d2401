"""The one entry point for the vocabulary projection and the training loss.

Implementations of the fused loss: ``reference`` (materializes the logits), ``xla_chunked`` (token x vocabulary
tiles in XLA, every backend), ``pallas_gpu`` / ``pallas_tpu`` (XLA matmuls per token block + Pallas row
kernels for the softmax work), and ``pallas_gpu_interpret`` / ``pallas_tpu_interpret`` (the same kernels run
by the interpreter on the CPU; tests). ``implementation=None`` (or "auto") takes :func:`automatic_implementation`
for the backend.

On a mesh, the Pallas loss runs per device inside ``shard_map`` (``pallas_kernels/sharding.py``): token rows
split over (``data``, ``fsdp``) and the sequence over ``tensor``, the weight whole on every device, the three
sums psum'd.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels import choices, dispatch
from pallas_kernels import sharding as kernel_sharding
from pallas_kernels.cross_entropy.reference import (
    CrossEntropyResult,
    fused_linear_cross_entropy_reference,
    project_logits_reference,
)

IMPLEMENTATIONS = choices.CROSS_ENTROPY
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


def automatic_implementation(backend: str, num_logits: int) -> tuple[str, str]:
    """(implementation, reason) that ``implementation=None`` picks on ``backend`` for ``num_logits`` = tokens x vocab."""
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
                            lambda: automatic_implementation(dispatch.backend(), num_tokens * weight.shape[1]))
    options = dict(logit_softcap=logit_softcap, z_loss=z_loss)
    if name == "reference":
        return fused_linear_cross_entropy_reference(hidden, weight, targets, loss_mask, **options)
    if name == "xla_chunked":
        from pallas_kernels.cross_entropy.xla_chunked import fused_linear_cross_entropy_xla_chunked

        return fused_linear_cross_entropy_xla_chunked(hidden, weight, targets, loss_mask, **options)
    from pallas_kernels.cross_entropy.pallas_rows import fused_linear_cross_entropy_pallas

    platform = "gpu" if name.startswith("pallas_gpu") else "tpu"
    kernel = functools.partial(fused_linear_cross_entropy_pallas, platform=platform,
                               interpret=name.endswith("interpret"), **options)
    return _pallas_per_device(kernel, hidden, weight, targets, loss_mask)


def _token_split(mesh, token_shape):
    """Per token dimension, the mesh axes splitting it: rows over (data, fsdp) and ``tensor`` over the last
    token dimension (the sequence of a [B, L] batch), else over the rows too; none where they do not divide."""
    rows = kernel_sharding.split_axes(mesh, token_shape[0], kernel_sharding.ROW_AXES)
    if len(token_shape) > 1:
        sequence = kernel_sharding.split_axes(mesh, token_shape[-1], (kernel_sharding.HEAD_AXIS,))
        if sequence:
            return [rows] + [()] * (len(token_shape) - 2) + [sequence]
    rows = kernel_sharding.split_axes(mesh, token_shape[0], kernel_sharding.ROW_AXES + (kernel_sharding.HEAD_AXIS,))
    return [rows] + [()] * (len(token_shape) - 1)


def _pallas_per_device(kernel, hidden, weight, targets, loss_mask):
    """``kernel`` on each device's tokens with the whole weight, sums psum'd, when the inputs live on a mesh.

    Every token's loss needs the whole vocabulary, so the weight is gathered into the map (its gradient is
    summed over the devices by shard_map's transpose); tokens are independent, so any split of them is exact
    up to float32 summation order. ``tensor`` splits tokens too: heads are no unit here, and the alternative
    would be every ``tensor`` device computing the same loss.
    """
    mesh = kernel_sharding.find_mesh(hidden, weight, targets, loss_mask)
    if mesh is None or not targets.shape:
        return kernel(hidden, weight, targets, loss_mask)
    token_axes = _token_split(mesh, targets.shape)
    used = tuple(name for axes in token_axes for name in axes)
    if not used:
        return kernel(hidden, weight, targets, loss_mask)
    tokens_spec = PartitionSpec(*(kernel_sharding.spec_entry(axes) for axes in token_axes))

    def per_device(hidden, weight, targets, loss_mask):
        sums = kernel(hidden, weight, targets, loss_mask)
        return CrossEntropyResult(*(jax.lax.psum(total, used) for total in sums))

    return kernel_sharding.run_per_device(per_device, mesh,
                                          (PartitionSpec(*tokens_spec, None), PartitionSpec(), tokens_spec,
                                           tokens_spec), PartitionSpec(), hidden, weight, targets, loss_mask)
