"""Dense attention with the block-diagonal causal mask: the oracle for every other implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(segment_ids_BL, *, causal=True, sliding_window=None):
    """[B, Lq, Lk] boolean mask: same segment, key not after query, key within the sliding window."""
    length = segment_ids_BL.shape[1]
    mask = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    q_idx = jnp.arange(length)[:, None]
    k_idx = jnp.arange(length)[None, :]
    if causal:
        mask &= k_idx <= q_idx
    if sliding_window is not None:
        mask &= (q_idx - k_idx) < sliding_window
    return mask


def attention_reference(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, *, causal=True, sliding_window=None,
                        logit_softcap=None, scale=None):
    """q [B, L, Hq, D], k/v [B, L, Hkv, D] with Hkv dividing Hq; returns [B, L, Hq, D] in q's dtype.

    Scores and softmax are computed in float32.
    """
    batch, length, num_q_heads, head_dim = q_BLHD.shape
    num_kv_heads = k_BLKD.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    q = q_BLHD.astype(jnp.float32).reshape(batch, length, num_kv_heads, group, head_dim)
    k = k_BLKD.astype(jnp.float32)
    v = v_BLKD.astype(jnp.float32)
    scores = jnp.einsum("blkgd,bmkd->bkglm", q, k) * scale
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    mask = attention_mask(segment_ids_BL, causal=causal, sliding_window=sliding_window)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkglm,bmkd->blkgd", probs, v)
    return out.reshape(batch, length, num_q_heads, head_dim).astype(q_BLHD.dtype)
