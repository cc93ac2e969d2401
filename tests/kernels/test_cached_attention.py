"""attention_over_cache (decode-time attention over a KV cache) against the dense reference on whole sequences."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention.cached import attention_over_cache, write_cache
from pallas_kernels.attention.reference import attention_reference
from tests.oracle import norm_relative_error


@pytest.mark.parametrize("heads, kv_heads, window, softcap", [(4, 4, None, None), (8, 2, None, None),
                                                              (4, 1, 5, None), (4, 2, None, 30.0)])
def test_prefix_queries_over_a_filled_cache_equal_causal_attention(heads, kv_heads, window, softcap):
    rng = np.random.default_rng(0)
    batch, length, dim = 2, 12, 16
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
    expected = attention_reference(q, k, v, jnp.ones((batch, length), jnp.int32), sliding_window=window,
                                   logit_softcap=softcap)
    # a cache longer than the sequence, holding garbage beyond it: the positional mask must hide it
    cache_k = jnp.asarray(rng.standard_normal((batch, 16, kv_heads, dim)), jnp.float32)
    cache_v = jnp.asarray(rng.standard_normal((batch, 16, kv_heads, dim)), jnp.float32)
    cache_k = write_cache(cache_k, k, jnp.zeros(batch, jnp.int32))
    cache_v = write_cache(cache_v, v, jnp.zeros(batch, jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    got = attention_over_cache(q, cache_k, cache_v, positions, sliding_window=window, logit_softcap=softcap)
    assert norm_relative_error(got, expected) <= 1e-6
    # one query per row at its own position (rows at different lengths)
    last = jnp.asarray([[length - 1], [length - 4]])
    one = attention_over_cache(q[jnp.arange(batch), last[:, 0]][:, None], cache_k, cache_v, last,
                               sliding_window=window, logit_softcap=softcap)
    rows = [expected[0, length - 1], attention_reference(q[1:, :length - 3], k[1:, :length - 3], v[1:, :length - 3],
                                                         jnp.ones((1, length - 3), jnp.int32), sliding_window=window,
                                                         logit_softcap=softcap)[0, -1]]
    assert norm_relative_error(one[:, 0], jnp.stack(rows)) <= 1e-6


def test_write_cache_puts_each_row_at_its_own_start():
    cache = jnp.zeros((2, 6, 1, 1))
    new = jnp.ones((2, 2, 1, 1)) * jnp.asarray([1.0, 2.0])[:, None, None, None]
    out = np.asarray(write_cache(cache, new, jnp.asarray([1, 3])))[..., 0, 0]
    assert out.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 2, 2, 0]]
