"""Memory-efficient blockwise attention in plain XLA (runs on every backend).

Design: the sequence is cut into query blocks and key blocks, so the [L, L] score matrix becomes a grid of
tiles. Before any arithmetic, one cheap pass over the segment ids marks the tiles whose mask (causal, sliding
window, same segment, for any row of the batch) is not empty, and lists them; the forward and backward passes
are each a single loop over that list, so a packed row pays only for the tiles that its segments cover and no
``lax.cond`` (with the copies of loop state it can cost) is needed to skip the others.

Inside the kernel the heads are laid out first, q as [B, K, G, L, D] (K key/value heads, G query heads per
key/value head) and k, v as [B, K, L, D], so every tile product is a plain batched matmul over (B, K) and XLA
inserts no transposes per tile.

The forward pass visits the tiles query block by query block and keeps, per query row, a running max, running
sum and running output (the "online softmax") in O(L) buffers; only one [B, K, G, block_q, block_k] score tile is
alive at a time, so memory is O(L), not O(L^2). It stores only the output and the per-row log-sum-exp.

The backward pass (``jax.custom_vjp``) visits the same tiles key block by key block, recomputes each tile's
probabilities from the stored log-sum-exp and adds the tile's share into dq, dk and dv (all O(L) buffers updated
in place). Masked scores are replaced by a finite large negative and probabilities are multiplied by the mask,
so a row with no visible key gives zeros, never NaN.

Attention sinks (gpt-oss: one learned logit per query head that joins every row's softmax without a value) enter
as the online softmax's starting state: the running max starts at the sink and the running sum at exp(0) = 1, so
the stored log-sum-exp already counts the sink and the backward's tile probabilities are the right ones. The sink's
own gradient is ``-sum over rows of p_sink * delta`` (``p_sink = exp(sink - lse)``, ``delta = dO . O``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.blocks import pad_length

_NEG = -1e30


def _tile_mask(seg_q_Bq, seg_k_Bk, q_start, k_start, causal, sliding_window):
    """[B, bq, bk] boolean mask of one tile, the same rule as reference.attention_mask."""
    mask = seg_q_Bq[:, :, None] == seg_k_Bk[:, None, :]
    q_pos = q_start + jnp.arange(seg_q_Bq.shape[1])[:, None]
    k_pos = k_start + jnp.arange(seg_k_Bk.shape[1])[None, :]
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return mask


def _visible_tiles(seg, causal, sliding_window, block_q, block_k):
    """(tiles in query-major order, tiles in key-major order, count): flat indices qi * nk + kj of the
    tiles whose mask is non-empty for some row, listed first; the rest of each list is never read."""
    length = seg.shape[1]
    num_q_blocks, num_k_blocks = length // block_q, length // block_k

    def one_query_block(qi):
        seg_q = lax.dynamic_slice_in_dim(seg, qi * block_q, block_q, axis=1)

        def one_key_block(kj):  # one [B, bq, bk] mask at a time, like the kernel's own tiles
            seg_k = lax.dynamic_slice_in_dim(seg, kj * block_k, block_k, axis=1)
            return _tile_mask(seg_q, seg_k, qi * block_q, kj * block_k, causal, sliding_window).any()

        return lax.map(one_key_block, jnp.arange(num_k_blocks))

    visible = lax.map(one_query_block, jnp.arange(num_q_blocks))  # [nq, nk]
    count = jnp.sum(visible.astype(jnp.int32))
    flat = jnp.arange(num_q_blocks * num_k_blocks, dtype=jnp.int32)
    query_major = flat[jnp.argsort(~visible.reshape(-1), stable=True)]
    key_major_flat = flat.reshape(num_q_blocks, num_k_blocks).T.reshape(-1)
    key_major = key_major_flat[jnp.argsort(~visible.T.reshape(-1), stable=True)]
    return query_major, key_major, count


def _scores(q_BKGqD, k_BKkD, scale, logit_softcap):
    """Float32 [B, K, G, bq, bk] scores (soft-capped if asked)."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_BKGqD, k_BKkD, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        s = jnp.tanh(s / logit_softcap) * logit_softcap
    return s


def _tile_inputs(tile, num_k_blocks, seg, q, k, v, block_q, block_k, causal, sliding_window):
    """One visible tile's (q_start, k_start, mask [B,1,1,bq,bk], q [B,K,G,bq,D], k and v [B,K,bk,D])."""
    q_start, k_start = (tile // num_k_blocks) * block_q, (tile % num_k_blocks) * block_k
    seg_q = lax.dynamic_slice_in_dim(seg, q_start, block_q, axis=1)
    seg_k = lax.dynamic_slice_in_dim(seg, k_start, block_k, axis=1)
    mask = _tile_mask(seg_q, seg_k, q_start, k_start, causal, sliding_window)[:, None, None]
    q_blk = lax.dynamic_slice_in_dim(q, q_start, block_q, axis=3)
    k_blk = lax.dynamic_slice_in_dim(k, k_start, block_k, axis=2)
    v_blk = lax.dynamic_slice_in_dim(v, k_start, block_k, axis=2)
    return q_start, k_start, mask, q_blk, k_blk, v_blk


def _forward(q, k, v, sinks, seg, causal, sliding_window, logit_softcap, scale, block_q, block_k):
    """q [B, K, G, Lp, D], k/v [B, K, Lp, D], sinks [K, G] or None, seg [B, Lp] -> (out like q in q's dtype,
    lse [B, K, G, Lp])."""
    batch, num_kv, group, length, _ = q.shape
    num_k_blocks = length // block_k
    tiles, _, count = _visible_tiles(seg, causal, sliding_window, block_q, block_k)

    def visit(i, carry):
        m_all, l_all, acc_all = carry
        q_start, k_start, mask, q_blk, k_blk, v_blk = _tile_inputs(tiles[i], num_k_blocks, seg, q, k, v, block_q,
                                                                   block_k, causal, sliding_window)
        m = lax.dynamic_slice_in_dim(m_all, q_start, block_q, axis=3)
        l = lax.dynamic_slice_in_dim(l_all, q_start, block_q, axis=3)
        acc = lax.dynamic_slice_in_dim(acc_all, q_start, block_q, axis=3)
        s = jnp.where(mask, _scores(q_blk, k_blk, scale, logit_softcap), _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
        acc = acc * correction[..., None] + pv
        return (lax.dynamic_update_slice_in_dim(m_all, m_new, q_start, axis=3),
                lax.dynamic_update_slice_in_dim(l_all, l, q_start, axis=3),
                lax.dynamic_update_slice_in_dim(acc_all, acc, q_start, axis=3))

    if sinks is None:
        m0 = jnp.full((batch, num_kv, group, length), _NEG, jnp.float32)
        l0 = jnp.zeros((batch, num_kv, group, length), jnp.float32)
    else:  # the sink is a key with logit `sink` and no value: max starts there, the sum at exp(0)
        m0 = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, :, None], (batch, num_kv, group, length))
        l0 = jnp.ones((batch, num_kv, group, length), jnp.float32)
    init = (m0, l0, jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lax.fori_loop(0, count, visit, init)
    visible = l > 0
    out = acc / jnp.where(visible, l, 1.0)[..., None]
    lse = jnp.where(visible, m + jnp.log(jnp.where(visible, l, 1.0)), 0.0)
    return out.astype(q.dtype), lse


def _backward(q, k, v, sinks, seg, out, lse, d_out, causal, sliding_window, logit_softcap, scale, block_q, block_k):
    num_k_blocks = q.shape[3] // block_k
    low_precision = q.dtype != jnp.float32
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    _, tiles, count = _visible_tiles(seg, causal, sliding_window, block_q, block_k)

    def visit(i, carry):
        dq, dk, dv = carry
        q_start, k_start, mask, q_blk, k_blk, v_blk = _tile_inputs(tiles[i], num_k_blocks, seg, q, k, v, block_q,
                                                                   block_k, causal, sliding_window)
        do_blk = lax.dynamic_slice_in_dim(d_out, q_start, block_q, axis=3)
        lse_blk = lax.dynamic_slice_in_dim(lse, q_start, block_q, axis=3)
        delta_blk = lax.dynamic_slice_in_dim(delta, q_start, block_q, axis=3)
        s = _scores(q_blk, k_blk, scale, logit_softcap)
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, _NEG) - lse_blk[..., None]), 0.0)
        dv_blk = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(d_out.dtype), do_blk, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_blk[..., None])
        if logit_softcap is not None:
            ds = ds * (1.0 - jnp.square(s / logit_softcap))
        ds = ds * scale
        if low_precision:
            ds = ds.astype(q.dtype)
        dk_blk = jnp.einsum("bkgqs,bkgqd->bksd", ds, q_blk, preferred_element_type=jnp.float32)
        dq_blk = jnp.einsum("bkgqs,bksd->bkgqd", ds, k_blk, preferred_element_type=jnp.float32)

        def add(total, part, start, axis):
            current = lax.dynamic_slice_in_dim(total, start, part.shape[axis], axis=axis)
            return lax.dynamic_update_slice_in_dim(total, current + part, start, axis=axis)

        return add(dq, dq_blk, q_start, 3), add(dk, dk_blk, k_start, 2), add(dv, dv_blk, k_start, 2)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = lax.fori_loop(0, count, visit, init)
    d_sinks = None
    if sinks is not None:
        p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, :, None] - lse)
        d_sinks = (-(p_sink * delta).sum(axis=(0, 3))).astype(sinks.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_sinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _chunked(q, k, v, sinks, seg, causal, sliding_window, logit_softcap, scale, block_q, block_k):
    return _forward(q, k, v, sinks, seg, causal, sliding_window, logit_softcap, scale, block_q, block_k)[0]


def _chunked_fwd(q, k, v, sinks, seg, causal, sliding_window, logit_softcap, scale, block_q, block_k):
    out, lse = _forward(q, k, v, sinks, seg, causal, sliding_window, logit_softcap, scale, block_q, block_k)
    return out, (q, k, v, sinks, seg, out, lse)


def _chunked_bwd(causal, sliding_window, logit_softcap, scale, block_q, block_k, residuals, d_out):
    q, k, v, sinks, seg, out, lse = residuals
    dq, dk, dv, d_sinks = _backward(q, k, v, sinks, seg, out, lse, d_out, causal, sliding_window, logit_softcap,
                                    scale, block_q, block_k)
    return dq, dk, dv, d_sinks, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def attention_xla_chunked(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, *, causal=True, sliding_window=None,
                          logit_softcap=None, scale=None, sinks=None, block_q=None, block_k=None):
    """Same contract and result as reference.attention_reference, in O(L) memory.

    Default blocks: 128 on the CPU (finer blocks skip more of a packed row's masked area; measured 2-5x faster
    than the dense reference at L = 256-1024), 512 on accelerators.
    """
    default_block = 128 if jax.default_backend() == "cpu" else 512
    block_q = block_q or default_block
    block_k = block_k or default_block
    batch, length, num_q_heads, head_dim = q_BLHD.shape
    num_kv_heads = k_BLKD.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    block_q = min(block_q, length)
    block_k = min(block_k, length)
    tile = block_q * block_k // _gcd(block_q, block_k)
    padded = -(-length // tile) * tile
    # Padded rows get segment -1: they see only each other and are cut off at the end.
    seg = pad_length(segment_ids_BL.astype(jnp.int32), padded, value=-1)
    q_BKGLD = pad_length(q_BLHD, padded).reshape(batch, padded, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k_BKLD = pad_length(k_BLKD, padded).transpose(0, 2, 1, 3)
    v_BKLD = pad_length(v_BLKD, padded).transpose(0, 2, 1, 3)
    sinks_KG = None if sinks is None else sinks.reshape(num_kv_heads, group)
    out = _chunked(q_BKGLD, k_BKLD, v_BKLD, sinks_KG, seg, causal, sliding_window, logit_softcap, scale,
                   block_q, block_k)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, num_q_heads, head_dim)[:, :length]


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a
