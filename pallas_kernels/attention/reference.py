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


def softmax_with_sinks(scores, sinks):
    """Softmax over the last axis with one extra logit per head (an attention sink) that takes probability mass
    but has no value: ``exp(s_j) / (sum_i exp(s_i) + exp(sink))``. ``sinks`` broadcasts against ``scores[..., 0]``.
    Without sinks (``None``) this is the plain softmax."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sinks = jnp.broadcast_to(sinks, scores.shape[:-1])[..., None].astype(scores.dtype)
    combined = jnp.concatenate([scores, sinks], axis=-1)
    return jax.nn.softmax(combined, axis=-1)[..., :-1]


def attention_reference(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, *, causal=True, sliding_window=None,
                        logit_softcap=None, scale=None, sinks=None):
    """q [B, L, Hq, D], k/v [B, L, Hkv, D] with Hkv dividing Hq; returns [B, L, Hq, D] in q's dtype.

    Scores and softmax are computed in float32. ``sinks`` [Hq] (optional): one learned logit per query head that
    joins every row's softmax without a value (gpt-oss), so a row may give less than all of its attention to keys.
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
    sinks_KG1 = None if sinks is None else sinks.astype(jnp.float32).reshape(num_kv_heads, group, 1)
    probs = softmax_with_sinks(scores, sinks_KG1)
    out = jnp.einsum("bkglm,bmkd->blkgd", probs, v)
    return out.reshape(batch, length, num_q_heads, head_dim).astype(q_BLHD.dtype)
