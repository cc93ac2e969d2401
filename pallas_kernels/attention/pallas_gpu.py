"""Flash attention forward and backward as Pallas kernels in the Triton style (GPU; interpretable on CPU).

Design: q/k/v are laid out [B, H, L, D]. The forward kernel runs one program per (batch, q head, query block);
it streams the key blocks its causal/sliding-window range can reach from the kv head ``h // group`` (GQA/MQA
without copying K/V), with an online softmax, and writes the output and the per-row log-sum-exp. The backward
is two kernels that recompute probabilities from that log-sum-exp: one program per (batch, q head, key block)
accumulates dk, dv over the query blocks that can see the key block (summed over the query heads of a group
afterwards), and one program per (batch, q head, query block) accumulates dq over its key blocks.

Work skipped and work made cheap:
- Blocks that share no segment with the program's block (computed once per call from the segment ids,
  ``segment_block_ranges``) are not visited at all, so a packed row costs about the sum of its examples' squares.
- Only boundary tiles pay for the mask: a tile whose query and key rows all lie in one segment, clear of the
  causal diagonal and of the sliding window's edge (a scalar check per tile on the segment ids' min and max),
  takes a branch without any mask arithmetic. Boundary tiles replace masked scores by a finite large negative
  and multiply probabilities by the mask, so padding and fully masked rows never produce NaN.
- Softmax runs in base 2: log2(e) is folded into the score scale and ``exp2`` replaces ``exp`` (the stored
  log-sum-exp is in base 2 too; it never leaves this module).
- With a causal mask the last query blocks see the most keys; the forward and dq grids run query blocks in
  reverse so the heaviest programs start first and the short ones fill the tail.

Triton needs power-of-two tile sides: a head_dim that is not one (80, 96) is zero-padded to the next power of two
before the kernels and cut off after. Zero columns add nothing to q.k, give zero output columns and zero
gradient columns, so the result is exact; the FLOPs are those of the padded tiles, which a masked load would
not save (``tl.dot`` tiles are powers of two either way).

Tiles and Triton launch parameters are per kernel (:class:`BlockSizes`); the defaults per head_dim were chosen
from the registers and spills of the kernels compiled for sm_90 (``pallas_kernels/lowering.py``,
``benchmarks/results/gpu_lowering_sm90.json``). On GPU the kernels are lowered with Triton
(``compiler_params=triton.CompilerParams``), the lowering jax still ships next to Mosaic GPU; ``interpret=True``
runs the same kernels on the CPU for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention.blocks import key_block_range, pad_length, query_block_range

_NEG = -1e30
_LOG2E = math.log2(math.e)
MIN_BLOCK = 16  # the smallest side of a tl.dot tile


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (query rows x key rows) and Triton ``num_warps`` / ``num_stages`` of the three kernels: the forward,
    the dk/dv kernel (``_dkv``) and the dq kernel (``_dq``). Tile sides are powers of two, at least 16."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_dkv: int = 4
    num_stages_dkv: int = 2
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps_dq: int = 4
    num_stages_dq: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.startswith("block_") and (value < MIN_BLOCK or value & (value - 1)):
                raise ValueError(f"attention_pallas_gpu: BlockSizes.{field.name} must be a power of two >= "
                                 f"{MIN_BLOCK}, got {value}")
            if field.name.startswith("num_") and value < 1:
                raise ValueError(f"attention_pallas_gpu: BlockSizes.{field.name} must be >= 1, got {value}")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "BlockSizes":
        """The defaults for a (power-of-two padded) head_dim: the largest tiles that compile without spills."""
        padded = max(MIN_BLOCK, next_power_of_two(head_dim))
        fitting = [dim for dim in DEFAULT_BLOCK_SIZES if dim >= padded]
        return DEFAULT_BLOCK_SIZES[min(fitting) if fitting else max(DEFAULT_BLOCK_SIZES)]

    def with_tiles(self, block_q: int | None, block_k: int | None) -> "BlockSizes":
        """The same launch parameters with every kernel's tiles set to ``block_q`` x ``block_k`` (None keeps)."""
        updates = {}
        for suffix in ("", "_dkv", "_dq"):
            if block_q is not None:
                updates["block_q" + suffix] = block_q
            if block_k is not None:
                updates["block_k" + suffix] = block_k
        return dataclasses.replace(self, **updates)

    def capped(self, length: int) -> "BlockSizes":
        """Tiles no longer than the (power-of-two rounded) row, so short rows are not padded to a whole tile."""
        cap = max(MIN_BLOCK, next_power_of_two(length))
        return dataclasses.replace(self, **{f.name: min(getattr(self, f.name), cap) for f in dataclasses.fields(self)
                                           if f.name.startswith("block_")})

    def kernel(self, name: str) -> tuple[int, int, int, int]:
        """(block_q, block_k, num_warps, num_stages) of kernel ``name``: "fwd", "dkv" or "dq"."""
        suffix = {"fwd": "", "dkv": "_dkv", "dq": "_dq"}[name]
        return tuple(getattr(self, field + suffix) for field in ("block_q", "block_k", "num_warps", "num_stages"))

    @property
    def max_block(self) -> int:
        return max(getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("block_"))


# Per padded head_dim, from the sm_90 register/spill sweep (benchmarks/results/gpu_lowering_sm90.json, rule in
# pallas_kernels.lowering.choose_defaults: no spills, <= 240 registers where possible, then the largest tile).
# The former 64x64 / 4 warps everywhere spilled in the dk/dv kernel from head_dim 128 and in all three at 256.
DEFAULT_BLOCK_SIZES = {
    64: BlockSizes(128, 64, 8, 2, block_q_dkv=128, block_k_dkv=64, num_warps_dkv=8, num_stages_dkv=2,
                   block_q_dq=128, block_k_dq=128, num_warps_dq=8, num_stages_dq=2),
    128: BlockSizes(128, 64, 8, 2, block_q_dkv=64, block_k_dkv=32, num_warps_dkv=8, num_stages_dkv=2,
                    block_q_dq=128, block_k_dq=64, num_warps_dq=8, num_stages_dq=2),
    256: BlockSizes(32, 64, 8, 2, block_q_dkv=32, block_k_dkv=32, num_warps_dkv=8, num_stages_dkv=2,
                    block_q_dq=64, block_k_dq=32, num_warps_dq=8, num_stages_dq=2),
}


def _compiler_params(interpret, num_warps, num_stages):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, contract_a, contract_b):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _program_block(reverse, num_blocks):
    """This program's block along the grid's last axis; walked backwards when ``reverse``."""
    i = pl.program_id(2)
    return num_blocks - 1 - i if reverse else i


def _scores(q, k, scale, logit_softcap):
    """(float32 [bq, bk] scores in base-2 units, the soft-capped natural scores or None without soft-capping)."""
    raw = _dot(q, k, 1, 1)
    if logit_softcap is None:
        return raw * (scale * _LOG2E), None
    capped = jnp.tanh(raw * (scale / logit_softcap)) * logit_softcap
    return capped * _LOG2E, capped


def _tile_mask(seg_q, seg_k, q_start, k_start, shape, causal, sliding_window):
    """[bq, bk] visibility of a tile: same segment, causal, inside the window (reference.attention_mask's rule)."""
    mask = seg_q[:, None] == seg_k[None, :]
    if causal or sliding_window is not None:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
        if causal:
            mask &= k_pos <= q_pos
        if sliding_window is not None:
            mask &= (q_pos - k_pos) < sliding_window
    return mask


def _interior(seg_q_lo, seg_q_hi, seg_k_lo, seg_k_hi, q_start, k_start, block_q, block_k, causal, sliding_window):
    """Whether every (query, key) pair of the tile is visible, so the tile needs no mask: one segment on both
    sides, the whole tile on or below the causal diagonal's left and inside the sliding window."""
    interior = (seg_q_lo == seg_q_hi) & (seg_k_lo == seg_k_hi) & (seg_q_lo == seg_k_lo)
    if causal:
        interior &= k_start + block_k - 1 <= q_start
    if sliding_window is not None:
        interior &= (q_start + block_q - 1) - k_start < sliding_window
    return interior


def _forward_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, key_range_ref, o_ref, lse_ref, *, scale, causal,
                    sliding_window, logit_softcap, block_q, block_k, num_q_blocks, num_k_blocks):
    q_start = _program_block(causal, num_q_blocks) * block_q
    q = q_ref[...]
    seg_q = seg_q_ref[...]
    seg_q_lo, seg_q_hi = seg_q.min(), seg_q.max()

    def visit(kj, carry):
        k_start = kj * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        seg_k = seg_k_ref[pl.ds(k_start, block_k)]
        s, _ = _scores(q, k, scale, logit_softcap)

        def update(masked):
            m, l, acc = carry
            scores = s
            if masked:
                mask = _tile_mask(seg_q, seg_k, q_start, k_start, s.shape, causal, sliding_window)
                scores = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, scores.max(axis=1))
            p = jnp.exp2(scores - m_new[:, None])
            if masked:
                p = jnp.where(mask, p, 0.0)
            correction = jnp.exp2(m - m_new)
            return (m_new, l * correction + p.sum(axis=1),
                    acc * correction[:, None] + _dot(p.astype(v.dtype), v, 1, 0))

        interior = _interior(seg_q_lo, seg_q_hi, seg_k.min(), seg_k.max(), q_start, k_start, block_q, block_k,
                             causal, sliding_window)
        return lax.cond(interior, lambda: update(False), lambda: update(True))

    head_dim = q.shape[-1]
    init = (jnp.full((block_q,), _NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, head_dim), jnp.float32))
    lo, hi = key_block_range(q_start, block_q, block_k, num_k_blocks, causal, sliding_window)
    lo, hi = jnp.maximum(lo, key_range_ref[0, 0]), jnp.minimum(hi, key_range_ref[0, 1])
    m, l, acc = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, init)
    visible = l > 0
    safe_l = jnp.where(visible, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(visible, m + jnp.log2(safe_l), 0.0)  # base 2


def _score_grads(s, capped, mask, lse, do, v, delta, scale, logit_softcap, dtype):
    """(probabilities, d scores scaled and cast for the next matmuls) of one tile; ``mask`` None = interior."""
    if mask is None:
        p = jnp.exp2(s - lse[:, None])
    else:
        p = jnp.where(mask, jnp.exp2(jnp.where(mask, s, _NEG) - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, 1, 1) - delta[:, None])
    if logit_softcap is not None:
        ds = ds * (1.0 - jnp.square(capped / logit_softcap))
    return p, (ds * scale).astype(dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref, seg_k_ref, query_range_ref, dk_ref,
                 dv_ref, *, scale, causal, sliding_window, logit_softcap, block_q, block_k, num_q_blocks):
    # Causal: the first key blocks are seen by the most query blocks, so the natural order is heaviest first.
    k_start = pl.program_id(2) * block_k
    k = k_ref[...]
    v = v_ref[...]
    seg_k = seg_k_ref[...]
    seg_k_lo, seg_k_hi = seg_k.min(), seg_k.max()

    def visit(qi, carry):
        q_start = qi * block_q
        q = q_ref[pl.ds(q_start, block_q), :]
        do = do_ref[pl.ds(q_start, block_q), :]
        lse = lse_ref[pl.ds(q_start, block_q)]
        delta = delta_ref[pl.ds(q_start, block_q)]
        seg_q = seg_q_ref[pl.ds(q_start, block_q)]
        s, capped = _scores(q, k, scale, logit_softcap)

        def update(masked):
            dk, dv = carry
            mask = _tile_mask(seg_q, seg_k, q_start, k_start, s.shape, causal, sliding_window) if masked else None
            p, ds = _score_grads(s, capped, mask, lse, do, v, delta, scale, logit_softcap, q.dtype)
            return dk + _dot(ds, q, 0, 0), dv + _dot(p.astype(do.dtype), do, 0, 0)

        interior = _interior(seg_q.min(), seg_q.max(), seg_k_lo, seg_k_hi, q_start, k_start, block_q, block_k,
                             causal, sliding_window)
        return lax.cond(interior, lambda: update(False), lambda: update(True))

    zeros = jnp.zeros(k.shape, jnp.float32)
    lo, hi = query_block_range(k_start, block_q, block_k, num_q_blocks, causal, sliding_window)
    lo, hi = jnp.maximum(lo, query_range_ref[0, 0]), jnp.minimum(hi, query_range_ref[0, 1])
    dk, dv = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref, seg_k_ref, key_range_ref, dq_ref, *, scale,
               causal, sliding_window, logit_softcap, block_q, block_k, num_q_blocks, num_k_blocks):
    q_start = _program_block(causal, num_q_blocks) * block_q
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    seg_q = seg_q_ref[...]
    seg_q_lo, seg_q_hi = seg_q.min(), seg_q.max()

    def visit(kj, dq):
        k_start = kj * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        seg_k = seg_k_ref[pl.ds(k_start, block_k)]
        s, capped = _scores(q, k, scale, logit_softcap)

        def update(masked):
            mask = _tile_mask(seg_q, seg_k, q_start, k_start, s.shape, causal, sliding_window) if masked else None
            _, ds = _score_grads(s, capped, mask, lse, do, v, delta, scale, logit_softcap, q.dtype)
            return dq + _dot(ds, k, 1, 0)

        interior = _interior(seg_q_lo, seg_q_hi, seg_k.min(), seg_k.max(), q_start, k_start, block_q, block_k,
                             causal, sliding_window)
        return lax.cond(interior, lambda: update(False), lambda: update(True))

    lo, hi = key_block_range(q_start, block_q, block_k, num_k_blocks, causal, sliding_window)
    lo, hi = jnp.maximum(lo, key_range_ref[0, 0]), jnp.minimum(hi, key_range_ref[0, 1])
    dq_ref[...] = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, jnp.zeros(q.shape, jnp.float32))


def _specs(group, length, head_dim, block_q, block_k, outer_is_query, reverse):
    """BlockSpecs for (q, k, v, do, lse, delta, seg_q, seg_k, the block-range table) given which axis the grid's
    3rd dim walks (query blocks or key blocks) and whether it walks them backwards."""
    num_blocks = length // (block_q if outer_is_query else block_k)

    def own(i):
        return num_blocks - 1 - i if reverse else i

    def full_q(b, h, i):
        return (b, h, 0, 0)

    def full_kv(b, h, i):
        return (b, h // group, 0, 0)

    if outer_is_query:
        q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, own(i), 0))
        kv_spec = pl.BlockSpec((None, None, length, head_dim), full_kv)
        row_spec = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, own(i)))
        seg_q_spec = pl.BlockSpec((None, block_q), lambda b, h, i: (b, own(i)))
        seg_k_spec = pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
    else:
        q_spec = pl.BlockSpec((None, None, length, head_dim), full_q)
        kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, i: (b, h // group, own(i), 0))
        row_spec = pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))
        seg_q_spec = pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
        seg_k_spec = pl.BlockSpec((None, block_k), lambda b, h, i: (b, own(i)))
    # The [lo, hi) block range of the program's own block, from a [B, num_blocks, 2] table.
    range_spec = pl.BlockSpec((None, 1, 2), lambda b, h, i: (b, own(i), 0))
    return q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec, range_spec


def segment_block_ranges(seg_BL, block_q, block_k):
    """Per query block, the key blocks its segments occupy, and per key block the query blocks of its segments.

    Returns int32 [B, nq, 2] and [B, nk, 2] half-open ranges: a block outside them shares no segment with the
    block, so the kernels never visit it (in a packed row, everything before the example's start).
    """
    batch, length = seg_BL.shape
    order = jnp.argsort(seg_BL, axis=1, stable=True)
    ordered = jnp.take_along_axis(seg_BL, order, axis=1)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), ordered[:, 1:] != ordered[:, :-1]], axis=1)
    ends = jnp.concatenate([ordered[:, 1:] != ordered[:, :-1], jnp.ones((batch, 1), bool)], axis=1)
    group_start = lax.cummax(jnp.where(starts, positions, 0), axis=1)
    group_end = lax.cummin(jnp.where(ends, positions, length), axis=1, reverse=True)
    inverse = jnp.argsort(order, axis=1)
    # Stable sort: a group's first (last) entry is its segment's first (last) position in the row.
    first = jnp.take_along_axis(jnp.take_along_axis(order, group_start, axis=1), inverse, axis=1)
    last = jnp.take_along_axis(jnp.take_along_axis(order, group_end, axis=1), inverse, axis=1)
    key_range = jnp.stack([first.reshape(batch, -1, block_q).min(-1) // block_k,
                           last.reshape(batch, -1, block_q).max(-1) // block_k + 1], axis=-1)
    query_range = jnp.stack([first.reshape(batch, -1, block_k).min(-1) // block_q,
                             last.reshape(batch, -1, block_k).max(-1) // block_q + 1], axis=-1)
    return key_range.astype(jnp.int32), query_range.astype(jnp.int32)



def _forward(q, k, v, seg, key_range, config):
    causal, sliding_window, logit_softcap, scale, blocks, interpret = config
    block_q, block_k, num_warps, num_stages = blocks.kernel("fwd")
    batch, num_heads, length, head_dim = q.shape
    group = num_heads // k.shape[1]
    q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec, range_spec = _specs(group, length, head_dim, block_q,
                                                                           block_k, True, causal)
    kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, sliding_window=sliding_window,
                               logit_softcap=logit_softcap, block_q=block_q, block_k=block_k,
                               num_q_blocks=length // block_q, num_k_blocks=length // block_k)
    return pl.pallas_call(
        kernel,
        grid=(batch, num_heads, length // block_q),
        in_specs=[q_spec, kv_spec, kv_spec, seg_q_spec, seg_k_spec, range_spec],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32)],
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name="sftjax_flash_attention_fwd",
    )(q, k, v, seg, seg, key_range)


def _backward(q, k, v, seg, query_range_dkv, key_range_dq, out, lse, d_out, config):
    causal, sliding_window, logit_softcap, scale, blocks, interpret = config
    batch, num_heads, length, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    delta = jnp.einsum("bhld,bhld->bhl", d_out.astype(jnp.float32), out.astype(jnp.float32))
    common = dict(scale=scale, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap)

    block_q, block_k, num_warps, num_stages = blocks.kernel("dkv")
    q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec, range_spec = _specs(group, length, head_dim, block_q,
                                                                           block_k, False, False)
    dkv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, i: (b, h, i, 0))
    dk_per_q_head, dv_per_q_head = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=block_q, block_k=block_k, num_q_blocks=length // block_q,
                          **common),
        grid=(batch, num_heads, length // block_k),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, seg_q_spec, seg_k_spec, range_spec],
        out_specs=[dkv_spec, dkv_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name="sftjax_flash_attention_dkdv",
    )(q, k, v, d_out, lse, delta, seg, seg, query_range_dkv)
    dk = dk_per_q_head.reshape(batch, num_kv, group, length, head_dim).sum(2).astype(k.dtype)
    dv = dv_per_q_head.reshape(batch, num_kv, group, length, head_dim).sum(2).astype(v.dtype)

    block_q, block_k, num_warps, num_stages = blocks.kernel("dq")
    q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec, range_spec = _specs(group, length, head_dim, block_q,
                                                                           block_k, True, causal)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_q=block_q, block_k=block_k, num_q_blocks=length // block_q,
                          num_k_blocks=length // block_k, **common),
        grid=(batch, num_heads, length // block_q),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, seg_q_spec, seg_k_spec, range_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name="sftjax_flash_attention_dq",
    )(q, k, v, d_out, lse, delta, seg, seg, key_range_dq)
    return dq.astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, seg, key_range_fwd, query_range_dkv, key_range_dq, config):
    return _forward(q, k, v, seg, key_range_fwd, config)[0]


def _flash_fwd(q, k, v, seg, key_range_fwd, query_range_dkv, key_range_dq, config):
    out, lse = _forward(q, k, v, seg, key_range_fwd, config)
    return out, (q, k, v, seg, query_range_dkv, key_range_dq, out, lse)


def _flash_bwd(config, residuals, d_out):
    q, k, v, seg, query_range_dkv, key_range_dq, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, seg, query_range_dkv, key_range_dq, out, lse, d_out, config)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_head_dim(x, head_dim):
    pad = head_dim - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def attention_pallas_gpu(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, *, causal=True, sliding_window=None,
                         logit_softcap=None, scale=None, block_sizes: BlockSizes | None = None, block_q=None,
                         block_k=None, interpret=False):
    """Same contract and result as reference.attention_reference; ``interpret=True`` runs on the CPU.

    ``block_sizes`` defaults to :meth:`BlockSizes.for_head_dim`; ``block_q`` / ``block_k`` set every kernel's
    tiles at once. Tiles are capped at the row length rounded up to a power of two.
    """
    length, head_dim = q_BLHD.shape[1], q_BLHD.shape[3]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    padded_dim = max(MIN_BLOCK, next_power_of_two(head_dim))
    blocks = (block_sizes or BlockSizes.for_head_dim(padded_dim)).with_tiles(block_q, block_k).capped(length)
    padded = -(-length // blocks.max_block) * blocks.max_block
    seg = pad_length(segment_ids_BL.astype(jnp.int32), padded, value=-1)
    q, k, v = (jnp.swapaxes(_pad_head_dim(pad_length(x, padded), padded_dim), 1, 2)
               for x in (q_BLHD, k_BLKD, v_BLKD))
    config = (causal, sliding_window, logit_softcap, scale, blocks, bool(interpret))
    ranges = {}

    def ranges_for(kernel):
        block_q, block_k = blocks.kernel(kernel)[:2]
        if (block_q, block_k) not in ranges:
            ranges[block_q, block_k] = segment_block_ranges(seg, block_q, block_k)
        return ranges[block_q, block_k]

    out = _flash(q, k, v, seg, ranges_for("fwd")[0], ranges_for("dkv")[1], ranges_for("dq")[0], config)
    return jnp.swapaxes(out, 1, 2)[:, :length, :, :head_dim]
