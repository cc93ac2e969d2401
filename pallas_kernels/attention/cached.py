"""Attention of new queries over a key/value cache (generation): the decode-time counterpart of ``attention``.

A cache holds the keys and values of positions ``0 .. S-1`` of each row; query ``t`` of row ``b`` sits at position
``q_positions[b, t]`` and sees the cache entries at positions ``<= q_positions[b, t]`` (and within the sliding
window). Entries beyond a row's current position may hold stale values from padding: the positional mask hides
them. Scores are float32. This is a dense computation (O(S) per query), which is what one-token decode steps need;
it is checked against :func:`pallas_kernels.attention.reference.attention_reference` on whole sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.reference import softmax_with_sinks


def attention_over_cache(q_BTHD, k_BSKD, v_BSKD, q_positions_BT, *, sliding_window=None, logit_softcap=None,
                         scale=None, sinks=None):
    """q [B, T, Hq, D] at positions q_positions [B, T]; cache k/v [B, S, Hkv, D]; returns [B, T, Hq, D].

    ``sinks`` [Hq]: optional per-head sink logits, as in :func:`attention_reference`."""
    batch, queries, num_q_heads, head_dim = q_BTHD.shape
    cache_length, num_kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"attention_over_cache: {num_kv_heads} kv heads do not divide {num_q_heads} query heads")
    scale = head_dim ** -0.5 if scale is None else scale
    q = q_BTHD.astype(jnp.float32).reshape(batch, queries, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->btkgs", q, k_BSKD.astype(jnp.float32)) * scale
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    key_positions = jnp.arange(cache_length)[None, None, :]
    query_positions = q_positions_BT[:, :, None]
    visible = key_positions <= query_positions
    if sliding_window is not None:
        visible &= (query_positions - key_positions) < sliding_window
    scores = jnp.where(visible[:, :, None, None, :], scores, jnp.finfo(jnp.float32).min)
    group = num_q_heads // num_kv_heads
    sinks_KG = None if sinks is None else sinks.astype(jnp.float32).reshape(num_kv_heads, group)
    probs = softmax_with_sinks(scores, sinks_KG)
    out = jnp.einsum("btkgs,bskd->btkgd", probs, v_BSKD.astype(jnp.float32))
    return out.reshape(batch, queries, num_q_heads, head_dim).astype(q_BTHD.dtype)


def write_cache(cache_BSKD, new_BTKD, start_B):
    """The cache with ``new`` written at positions ``start_B[b] .. start_B[b] + T - 1`` of each row."""
    def one(row_SKD, new_TKD, start):
        return jax.lax.dynamic_update_slice(row_SKD, new_TKD.astype(row_SKD.dtype), (start, 0, 0))

    return jax.vmap(one)(cache_BSKD, new_BTKD, start_B)
