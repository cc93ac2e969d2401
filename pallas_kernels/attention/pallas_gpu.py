"""Flash attention forward and backward as Pallas kernels in the Triton style (GPU; interpretable on CPU).

Design: q/k/v are laid out [B, H, L, D]. The forward kernel runs one program per (batch, q head, query block);
it streams the key blocks its causal/sliding-window range can reach from the kv head ``h // group`` (GQA/MQA
without copying K/V), with an online softmax, and writes the output and the per-row log-sum-exp. The backward
is two kernels that recompute probabilities from that log-sum-exp: one program per (batch, q head, key block)
accumulates dk, dv over the query blocks that can see the key block (summed over the query heads of a group
afterwards), and one program per (batch, q head, query block) accumulates dq over its key blocks. Segment
masks are applied per tile; masked scores are a finite large negative and probabilities are multiplied by the
mask, so padding and fully masked tiles never produce NaN. Blocks that share no segment with the program's
block (computed once per call from the segment ids, ``segment_block_ranges``) are not visited at all, so a
packed row costs about the sum of its examples' squares, not the row's.

On GPU the kernels are lowered with Triton (``compiler_params=triton.CompilerParams``), the lowering jax
still ships next to Mosaic GPU; ``interpret=True`` runs the same kernels on the CPU for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention.xla_chunked import _key_block_range, _pad_length, _query_block_range

_NEG = -1e30


def _compiler_params(interpret, num_warps=4, num_stages=2):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, contract_a, contract_b):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _tile(q, k, seg_q, seg_k, q_start, k_start, scale, causal, sliding_window, logit_softcap):
    """Scores [bq, bk] (soft-capped, float32) and the tile's mask."""
    s = _dot(q, k, 1, 1) * scale
    if logit_softcap is not None:
        s = jnp.tanh(s / logit_softcap) * logit_softcap
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    mask = seg_q[:, None] == seg_k[None, :]
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return s, mask


def _forward_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, key_range_ref, o_ref, lse_ref, *, scale, causal,
                    sliding_window, logit_softcap, block_q, block_k, num_k_blocks):
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]
    seg_q = seg_q_ref[...]

    def visit(kj, carry):
        m, l, acc = carry
        k_start = kj * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        seg_k = seg_k_ref[pl.ds(k_start, block_k)]
        s, mask = _tile(q, k, seg_q, seg_k, q_start, k_start, scale, causal, sliding_window, logit_softcap)
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=1)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
        return m_new, l, acc

    head_dim = q.shape[-1]
    init = (jnp.full((block_q,), _NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, head_dim), jnp.float32))
    lo, hi = _key_block_range(q_start, block_q, block_k, num_k_blocks, causal, sliding_window)
    lo, hi = jnp.maximum(lo, key_range_ref[0, 0]), jnp.minimum(hi, key_range_ref[0, 1])
    m, l, acc = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, init)
    visible = l > 0
    safe_l = jnp.where(visible, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(visible, m + jnp.log(safe_l), 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref, seg_k_ref, query_range_ref, dk_ref,
                 dv_ref, *, scale, causal, sliding_window, logit_softcap, block_q, block_k, num_q_blocks):
    k_start = pl.program_id(2) * block_k
    k = k_ref[...]
    v = v_ref[...]
    seg_k = seg_k_ref[...]

    def visit(qi, carry):
        dk, dv = carry
        q_start = qi * block_q
        q = q_ref[pl.ds(q_start, block_q), :]
        do = do_ref[pl.ds(q_start, block_q), :]
        lse = lse_ref[pl.ds(q_start, block_q)]
        delta = delta_ref[pl.ds(q_start, block_q)]
        seg_q = seg_q_ref[pl.ds(q_start, block_q)]
        s, mask = _tile(q, k, seg_q, seg_k, q_start, k_start, scale, causal, sliding_window, logit_softcap)
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, _NEG) - lse[:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
        dp = _dot(do, v, 1, 1)
        ds = p * (dp - delta[:, None])
        if logit_softcap is not None:
            ds = ds * (1.0 - jnp.square(s / logit_softcap))
        ds = (ds * scale).astype(q.dtype)
        dk = dk + _dot(ds, q, 0, 0)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    lo, hi = _query_block_range(k_start, block_q, block_k, num_q_blocks, causal, sliding_window)
    lo, hi = jnp.maximum(lo, query_range_ref[0, 0]), jnp.minimum(hi, query_range_ref[0, 1])
    dk, dv = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref, seg_k_ref, key_range_ref, dq_ref, *, scale,
               causal, sliding_window, logit_softcap, block_q, block_k, num_k_blocks):
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    seg_q = seg_q_ref[...]

    def visit(kj, dq):
        k_start = kj * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        seg_k = seg_k_ref[pl.ds(k_start, block_k)]
        s, mask = _tile(q, k, seg_q, seg_k, q_start, k_start, scale, causal, sliding_window, logit_softcap)
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, _NEG) - lse[:, None]), 0.0)
        dp = _dot(do, v, 1, 1)
        ds = p * (dp - delta[:, None])
        if logit_softcap is not None:
            ds = ds * (1.0 - jnp.square(s / logit_softcap))
        ds = (ds * scale).astype(q.dtype)
        return dq + _dot(ds, k, 1, 0)

    lo, hi = _key_block_range(q_start, block_q, block_k, num_k_blocks, causal, sliding_window)
    lo, hi = jnp.maximum(lo, key_range_ref[0, 0]), jnp.minimum(hi, key_range_ref[0, 1])
    dq_ref[...] = lax.fori_loop(lo, jnp.maximum(lo, hi), visit, jnp.zeros(q.shape, jnp.float32))


def _specs(batch, num_heads, group, length, head_dim, block_q, block_k, outer_is_query):
    """BlockSpecs for (q, k, v, do, lse, delta, seg_q, seg_k) given which axis the grid's 3rd dim walks."""
    def full_q(b, h, i):
        return (b, h, 0, 0)

    def full_kv(b, h, i):
        return (b, h // group, 0, 0)

    if outer_is_query:
        q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
        kv_spec = pl.BlockSpec((None, None, length, head_dim), full_kv)
        row_spec = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
        seg_q_spec = pl.BlockSpec((None, block_q), lambda b, h, i: (b, i))
        seg_k_spec = pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
    else:
        q_spec = pl.BlockSpec((None, None, length, head_dim), full_q)
        kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, i: (b, h // group, i, 0))
        row_spec = pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))
        seg_q_spec = pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
        seg_k_spec = pl.BlockSpec((None, block_k), lambda b, h, i: (b, i))
    return q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec


def _range_spec():
    """The [lo, hi) block range of the program's own block, from a [B, num_blocks, 2] table."""
    return pl.BlockSpec((None, 1, 2), lambda b, h, i: (b, i, 0))


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
    causal, sliding_window, logit_softcap, scale, block_q, block_k, interpret = config
    batch, num_heads, length, head_dim = q.shape
    group = num_heads // k.shape[1]
    q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec = _specs(batch, num_heads, group, length, head_dim,
                                                               block_q, block_k, True)
    kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, sliding_window=sliding_window,
                               logit_softcap=logit_softcap, block_q=block_q, block_k=block_k,
                               num_k_blocks=length // block_k)
    return pl.pallas_call(
        kernel,
        grid=(batch, num_heads, length // block_q),
        in_specs=[q_spec, kv_spec, kv_spec, seg_q_spec, seg_k_spec, _range_spec()],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32)],
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name="sftjax_flash_attention_fwd",
    )(q, k, v, seg, seg, key_range)


def _backward(q, k, v, seg, key_range, query_range, out, lse, d_out, config):
    causal, sliding_window, logit_softcap, scale, block_q, block_k, interpret = config
    batch, num_heads, length, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    delta = jnp.einsum("bhld,bhld->bhl", d_out.astype(jnp.float32), out.astype(jnp.float32))
    common = dict(scale=scale, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap,
                  block_q=block_q, block_k=block_k)

    q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec = _specs(batch, num_heads, group, length, head_dim,
                                                               block_q, block_k, False)
    dkv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, i: (b, h, i, 0))
    dk_per_q_head, dv_per_q_head = pl.pallas_call(
        functools.partial(_dkdv_kernel, num_q_blocks=length // block_q, **common),
        grid=(batch, num_heads, length // block_k),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, seg_q_spec, seg_k_spec, _range_spec()],
        out_specs=[dkv_spec, dkv_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name="sftjax_flash_attention_dkdv",
    )(q, k, v, d_out, lse, delta, seg, seg, query_range)
    dk = dk_per_q_head.reshape(batch, num_kv, group, length, head_dim).sum(2).astype(k.dtype)
    dv = dv_per_q_head.reshape(batch, num_kv, group, length, head_dim).sum(2).astype(v.dtype)

    q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec = _specs(batch, num_heads, group, length, head_dim,
                                                               block_q, block_k, True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, num_k_blocks=length // block_k, **common),
        grid=(batch, num_heads, length // block_q),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, seg_q_spec, seg_k_spec, _range_spec()],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name="sftjax_flash_attention_dq",
    )(q, k, v, d_out, lse, delta, seg, seg, key_range)
    return dq.astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, seg, key_range, query_range, config):
    return _forward(q, k, v, seg, key_range, config)[0]


def _flash_fwd(q, k, v, seg, key_range, query_range, config):
    out, lse = _forward(q, k, v, seg, key_range, config)
    return out, (q, k, v, seg, key_range, query_range, out, lse)


def _flash_bwd(config, residuals, d_out):
    q, k, v, seg, key_range, query_range, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, seg, key_range, query_range, out, lse, d_out, config)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_pallas_gpu(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, *, causal=True, sliding_window=None,
                         logit_softcap=None, scale=None, block_q=64, block_k=64, interpret=False):
    """Same contract and result as reference.attention_reference; ``interpret=True`` runs on the CPU."""
    length, head_dim = q_BLHD.shape[1], q_BLHD.shape[3]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    block = max(block_q, block_k)
    if block % block_q or block % block_k:
        raise ValueError(f"attention_pallas_gpu: block_q {block_q} and block_k {block_k} must divide each other")
    padded = -(-length // block) * block
    seg = _pad_length(segment_ids_BL.astype(jnp.int32), padded, value=-1)
    q, k, v = (jnp.swapaxes(_pad_length(x, padded), 1, 2) for x in (q_BLHD, k_BLKD, v_BLKD))
    config = (causal, sliding_window, logit_softcap, scale, block_q, block_k, bool(interpret))
    key_range, query_range = segment_block_ranges(seg, block_q, block_k)
    out = _flash(q, k, v, seg, key_range, query_range, config)
    return jnp.swapaxes(out, 1, 2)[:, :length]
