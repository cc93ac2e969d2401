"""Tiling helpers shared by the blockwise attention implementations (xla_chunked, pallas_gpu, splash_tpu).

Rows are cut into query blocks of ``block_q`` and key blocks of ``block_k``; the causal mask and a sliding window
bound which key blocks a query block can reach (and which query blocks can see a key block), so a kernel visits
only that half-open ``[lo, hi)`` range of blocks.
"""

from __future__ import annotations

import jax.numpy as jnp


def pad_length(x, length, value=0):
    """``x`` [B, L, ...] padded with ``value`` along axis 1 to ``length``."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def key_block_range(q_start, block_q, block_k, num_k_blocks, causal, sliding_window):
    """[lo, hi) key blocks reachable from the query rows [q_start, q_start + block_q)."""
    hi = jnp.minimum(num_k_blocks, (q_start + block_q - 1) // block_k + 1) if causal else num_k_blocks
    lo = 0
    if sliding_window is not None:
        lo = jnp.maximum(0, (q_start - sliding_window + 1) // block_k)
    return lo, hi


def query_block_range(k_start, block_q, block_k, num_q_blocks, causal, sliding_window):
    """[lo, hi) query blocks that can see the key rows [k_start, k_start + block_k)."""
    lo = k_start // block_q if causal else 0
    hi = num_q_blocks
    if sliding_window is not None:
        hi = jnp.minimum(num_q_blocks, (k_start + block_k - 1 + sliding_window - 1) // block_q + 1)
    return lo, hi
