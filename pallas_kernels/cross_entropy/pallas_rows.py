"""Fused linear cross-entropy with the row-wise softmax work in Pallas kernels (GPU via Triton; TPU).

Design (the split that GPU fused-CE kernels such as Liger's use): the big matmuls stay with the vendor
library, the memory-bound row work goes into kernels. Tokens are processed ``block_t`` at a time in an XLA
loop; for each token block the [block_t, V] logits tile is computed by a matmul, and a Pallas kernel walks it
in vocabulary chunks (online max / sum of exponentials, target logit, argmax). Only the per-token log-sum-exp
is kept. The backward recomputes each token block's logits, a second Pallas kernel turns them in place into
``(softmax * (1 + 2 z lse) - onehot) * g * mask`` (with the soft-cap derivative), and two matmuls give the
block's d_hidden and its contribution to d_weight. Memory is O(block_t * V) instead of O(tokens * V); token
blocks with no trained token are skipped with ``lax.cond``.

Chunks and the vocabulary: Triton tiles must be powers of two, so the chunk is the largest power of two not
above ``block_v`` and V; a V the chunk does not divide is handled by sliding the last chunk back to end at V,
the kernels ignoring (forward) or rewriting identically (backward) the columns an earlier chunk covered. On TPU
the chunk must also start on a 128-lane boundary: when V is not a multiple of 128 the logits tile is padded to
one and the padded columns are masked (no probability, zero gradient).

Per-row values travel as [rows, 1] columns, a layout both lowerings accept (Mosaic refuses rank-1 blocks of 8
rows). Tile sizes and the Triton launch parameters of the two kernels are in :class:`BlockSizes`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.cross_entropy.reference import CrossEntropyResult

TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """``block_t`` tokens per XLA matmul block, ``block_rows`` rows per kernel program, ``block_v`` the widest
    vocabulary chunk (rounded down to a power of two and to V), and the Triton ``num_warps`` / ``num_stages`` of
    the statistics and the gradient kernel (ignored on TPU)."""

    block_t: int = 1024
    block_v: int = 1024
    block_rows: int = 16
    num_warps_stats: int = 4
    num_stages_stats: int = 2
    num_warps_grad: int = 4
    num_stages_grad: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"fused_linear_cross_entropy: BlockSizes.{field.name} must be >= 1, got "
                                 f"{getattr(self, field.name)}")
        if self.block_t % self.block_rows:
            raise ValueError(f"fused_linear_cross_entropy: block_t {self.block_t} must be a multiple of block_rows "
                             f"{self.block_rows}")

    @classmethod
    def for_platform(cls, platform: str) -> "BlockSizes":
        return DEFAULT_BLOCK_SIZES[platform]


# GPU: from the sm_90 register/spill sweep (benchmarks/results/gpu_lowering_sm90.json): the former 16 rows x
# 1024 columns at 4 warps spilled in the statistics kernel (255 registers, 720 bytes of spill stores).
DEFAULT_BLOCK_SIZES = {
    "gpu": BlockSizes(block_rows=8, num_warps_stats=8, num_warps_grad=8),
    "tpu": BlockSizes(block_rows=8),
}


def chunk_width(vocab: int, block_v: int, platform: str) -> tuple[int, int]:
    """(vocabulary chunk, width of the logits tile the kernels walk) for a vocabulary of ``vocab`` columns."""
    if platform == "tpu":
        width = -(-vocab // TPU_LANES) * TPU_LANES
        chunk = TPU_LANES
        while chunk * 2 <= min(block_v, width):
            chunk *= 2
        return chunk, width
    chunk = 1
    while chunk * 2 <= min(block_v, vocab):
        chunk *= 2
    return chunk, vocab


def _compiler_params(platform, interpret, num_warps, num_stages):
    if interpret:
        return None
    if platform == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return None


def _interpret_arg(platform, interpret):
    if not interpret:
        return False
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return True


def _softcap(raw, logit_softcap):
    return raw if logit_softcap is None else jnp.tanh(raw / logit_softcap) * logit_softcap


def _chunk(logits_ref, vj, *, vocab, width, block_v, logit_softcap):
    """Chunk ``vj``: (its float32 soft-capped logits, column ids, mask of the columns it owns: not covered by an
    earlier chunk and inside the vocabulary)."""
    first_new = vj * block_v
    start = jnp.minimum(first_new, width - block_v)
    logits = _softcap(logits_ref[:, pl.ds(start, block_v)].astype(jnp.float32), logit_softcap)
    cols = start + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    owned = cols >= first_new
    if width != vocab:
        owned &= cols < vocab
    return start, logits, cols, owned


def _stats_kernel(logits_ref, targets_ref, lse_ref, target_logit_ref, argmax_ref, *, vocab, width, block_v,
                  logit_softcap):
    rows = targets_ref.shape[0]
    targets = targets_ref[...]  # [rows, 1]

    def visit(vj, carry):
        m, l, target_logit, best, best_idx = carry
        _, logits, cols, owned = _chunk(logits_ref, vj, vocab=vocab, width=width, block_v=block_v,
                                        logit_softcap=logit_softcap)
        logits_new = jnp.where(owned, logits, -jnp.inf)
        chunk_max = logits_new.max(axis=1, keepdims=True)
        # First column reaching the chunk max: matches jnp.argmax's tie rule.
        chunk_arg = jnp.min(jnp.where(logits_new == chunk_max, cols, vocab), axis=1, keepdims=True)
        m_new = jnp.maximum(m, chunk_max)
        l = l * jnp.exp(m - m_new) + jnp.exp(logits_new - m_new).sum(axis=1, keepdims=True)
        hit = (cols == targets) & owned
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=1, keepdims=True)
        better = chunk_max > best
        return m_new, l, target_logit, jnp.where(better, chunk_max, best), jnp.where(better, chunk_arg, best_idx)

    neg_inf = jnp.full((rows, 1), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((rows, 1), jnp.float32)
    init = (neg_inf, zeros, zeros, neg_inf, jnp.zeros((rows, 1), jnp.int32))
    m, l, target_logit, _, best_idx = lax.fori_loop(0, pl.cdiv(vocab, block_v), visit, init)
    lse_ref[...] = m + jnp.log(l)
    target_logit_ref[...] = target_logit
    argmax_ref[...] = best_idx


def _grad_kernel(logits_ref, targets_ref, lse_ref, row_scale_ref, d_logits_ref, *, vocab, width, block_v,
                 logit_softcap, z_loss):
    targets = targets_ref[...]  # [rows, 1]
    lse = lse_ref[...]
    row_scale = row_scale_ref[...]

    def visit(vj, _):
        start, logits, cols, owned = _chunk(logits_ref, vj, vocab=vocab, width=width, block_v=block_v,
                                            logit_softcap=logit_softcap)
        probs = jnp.exp(logits - lse)
        if z_loss:
            probs = probs * (1.0 + 2.0 * z_loss * lse)
        d = (probs - (cols == targets).astype(jnp.float32)) * row_scale
        if logit_softcap is not None:
            d = d * (1.0 - jnp.square(logits / logit_softcap))
        if width != vocab:
            d = jnp.where(cols < vocab, d, 0.0)
        d_logits_ref[:, pl.ds(start, block_v)] = d.astype(d_logits_ref.dtype)
        return 0

    lax.fori_loop(0, pl.cdiv(width, block_v), visit, 0)


def _row_call(kernel, name, logits, row_inputs, out_shape, num_warps, num_stages, config):
    """One program per ``block_rows`` rows of the [tokens, width] logits; per-row values are [tokens, 1]."""
    logit_softcap, z_loss, blocks, vocab, platform, interpret = config
    tokens, width = logits.shape
    block_v, _ = chunk_width(vocab, blocks.block_v, platform)
    rows = blocks.block_rows
    row_spec = pl.BlockSpec((rows, 1), lambda i: (i, 0))
    tile_spec = pl.BlockSpec((rows, width), lambda i: (i, 0))
    def spec(shape):
        return tile_spec if shape.shape == logits.shape else row_spec

    return pl.pallas_call(
        functools.partial(kernel, vocab=vocab, width=width, block_v=block_v, logit_softcap=logit_softcap),
        grid=(tokens // rows,),
        in_specs=[tile_spec] + [row_spec] * len(row_inputs),
        out_specs=[spec(o) for o in out_shape] if isinstance(out_shape, list) else spec(out_shape),
        out_shape=out_shape,
        interpret=_interpret_arg(platform, interpret),
        compiler_params=_compiler_params(platform, interpret, num_warps, num_stages),
        name=name,
    )(logits, *(x.reshape(tokens, 1) for x in row_inputs))


def _block_logits(h_blk, weight, config):
    """[block_t, width] float32 logits of a token block (padded to the kernels' width on TPU when needed)."""
    logits = jnp.einsum("td,dv->tv", h_blk, weight, preferred_element_type=jnp.float32)
    vocab, platform = config[3], config[4]
    width = chunk_width(vocab, config[2].block_v, platform)[1]
    if width != vocab:
        logits = jnp.pad(logits, ((0, 0), (0, width - vocab)))
    return logits


def _row_stats(logits, targets, config):
    blocks = config[2]
    tokens = logits.shape[0]
    column = lambda dtype: jax.ShapeDtypeStruct((tokens, 1), dtype)  # noqa: E731
    lse, target_logit, argmax = _row_call(
        _stats_kernel, "sftjax_ce_row_stats", logits, [targets],
        [column(jnp.float32), column(jnp.float32), column(jnp.int32)], blocks.num_warps_stats,
        blocks.num_stages_stats, config)
    return lse.reshape(-1), target_logit.reshape(-1), argmax.reshape(-1)


def _row_grads(logits, targets, lse, row_scale, out_dtype, config):
    blocks = config[2]
    kernel = functools.partial(_grad_kernel, z_loss=config[1])
    d_logits = _row_call(kernel, "sftjax_ce_row_grads", logits, [targets, lse, row_scale],
                         jax.ShapeDtypeStruct(logits.shape, out_dtype), blocks.num_warps_grad,
                         blocks.num_stages_grad, config)
    return d_logits[:, :config[3]]


def _forward(hidden, weight, targets, mask, config):
    block_t = config[2].block_t

    def one_block(ti):
        t_start = ti * block_t
        mask_blk = lax.dynamic_slice_in_dim(mask, t_start, block_t)

        def compute(_):
            h_blk = lax.dynamic_slice_in_dim(hidden, t_start, block_t)
            tgt_blk = lax.dynamic_slice_in_dim(targets, t_start, block_t)
            logits = _block_logits(h_blk, weight, config)
            lse, target_logit, argmax = _row_stats(logits, tgt_blk, config)
            per_token = lse - target_logit
            if config[1]:
                per_token = per_token + config[1] * jnp.square(lse)
            w = mask_blk.astype(jnp.float32)
            return jnp.sum(per_token * w), jnp.sum((argmax == tgt_blk).astype(jnp.float32) * w), lse

        def skip(_):
            return jnp.float32(0), jnp.float32(0), jnp.zeros((block_t,), jnp.float32)

        return lax.cond(jnp.any(mask_blk != 0), compute, skip, None)

    loss, correct, lse = lax.map(one_block, jnp.arange(hidden.shape[0] // block_t))
    return loss.sum(), correct.sum(), lse.reshape(-1)


def _backward(hidden, weight, targets, mask, lse, g_loss, config):
    block_t = config[2].block_t
    row_scale = g_loss * mask.astype(jnp.float32)

    def one_block(carry, ti):
        d_weight = carry
        t_start = ti * block_t
        mask_blk = lax.dynamic_slice_in_dim(mask, t_start, block_t)

        def compute(d_weight):
            h_blk = lax.dynamic_slice_in_dim(hidden, t_start, block_t)
            logits = _block_logits(h_blk, weight, config)
            d_logits = _row_grads(logits, lax.dynamic_slice_in_dim(targets, t_start, block_t),
                                  lax.dynamic_slice_in_dim(lse, t_start, block_t),
                                  lax.dynamic_slice_in_dim(row_scale, t_start, block_t), hidden.dtype, config)
            dh = jnp.einsum("tv,dv->td", d_logits, weight, preferred_element_type=jnp.float32)
            dw = jnp.einsum("td,tv->dv", h_blk, d_logits, preferred_element_type=jnp.float32)
            return d_weight + dw, dh.astype(hidden.dtype)

        def skip(d_weight):
            return d_weight, jnp.zeros((block_t, hidden.shape[1]), hidden.dtype)

        return lax.cond(jnp.any(mask_blk != 0), compute, skip, d_weight)

    d_weight, dh_blocks = lax.scan(one_block, jnp.zeros(weight.shape, jnp.float32),
                                   jnp.arange(hidden.shape[0] // block_t))
    return dh_blocks.reshape(hidden.shape), d_weight.astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden, weight, targets, mask, config):
    loss, correct, _ = _forward(hidden, weight, targets, mask, config)
    return loss, correct


def _fused_fwd(hidden, weight, targets, mask, config):
    loss, correct, lse = _forward(hidden, weight, targets, mask, config)
    return (loss, correct), (hidden, weight, targets, mask, lse)


def _fused_bwd(config, residuals, cotangents):
    hidden, weight, targets, mask, lse = residuals
    d_hidden, d_weight = _backward(hidden, weight, targets, mask, lse, cotangents[0], config)
    return d_hidden, d_weight, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_cross_entropy_pallas(hidden, weight, targets, loss_mask, *, logit_softcap=None, z_loss=0.0,
                                      platform="gpu", interpret=False, block_sizes: BlockSizes | None = None,
                                      block_t=None, block_v=None, block_rows=None):
    """Same contract as the reference; ``platform`` 'gpu' (Triton) or 'tpu' (Mosaic), ``interpret`` for CPU.

    ``block_sizes`` defaults to :meth:`BlockSizes.for_platform`; ``block_t`` / ``block_v`` / ``block_rows``
    override single fields. ``block_t`` is capped at the token count (rounded up to ``block_rows``).
    """
    if platform not in DEFAULT_BLOCK_SIZES:
        raise ValueError(f"fused_linear_cross_entropy: platform must be 'gpu' or 'tpu', got {platform!r}")
    hidden_dim = hidden.shape[-1]
    vocab = weight.shape[1]
    hidden_TD = hidden.reshape(-1, hidden_dim)
    targets_T = targets.reshape(-1).astype(jnp.int32)
    mask_T = loss_mask.reshape(-1)
    num_tokens = hidden_TD.shape[0]
    blocks = block_sizes or BlockSizes.for_platform(platform)
    rows = block_rows or blocks.block_rows
    wanted_t = block_t or blocks.block_t
    if wanted_t % rows:
        raise ValueError(f"fused_linear_cross_entropy: block_t {wanted_t} must be a multiple of block_rows {rows}")
    blocks = dataclasses.replace(blocks, block_rows=rows, block_v=block_v or blocks.block_v,
                                 block_t=max(rows, min(wanted_t, -(-num_tokens // rows) * rows)))
    padded = -(-num_tokens // blocks.block_t) * blocks.block_t
    if padded != num_tokens:
        extra = padded - num_tokens
        hidden_TD = jnp.pad(hidden_TD, ((0, extra), (0, 0)))
        targets_T = jnp.pad(targets_T, (0, extra))
        mask_T = jnp.pad(mask_T, (0, extra))
    config = (None if logit_softcap is None else float(logit_softcap), float(z_loss), blocks, vocab, platform,
              bool(interpret))
    loss, correct = _fused(hidden_TD, weight, targets_T, mask_T, config)
    return CrossEntropyResult(loss_sum=loss, token_count=jnp.sum(loss_mask.astype(jnp.float32)),
                              correct_count=lax.stop_gradient(correct))
