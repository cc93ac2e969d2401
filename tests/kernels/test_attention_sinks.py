"""Attention sinks (one learned logit per query head that joins the softmax without a value, as gpt-oss has) in
the reference, the blockwise ``xla_chunked`` implementation and the decode-time cache attention, against
transformers' gpt-oss ``eager_attention_forward`` run in PyTorch: outputs and the gradients of q, k, v and sinks.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import require

from pallas_kernels.attention.api import attention
from pallas_kernels.attention.cached import attention_over_cache
from pallas_kernels.attention.reference import attention_mask
from tests.oracle import norm_relative_error

torch = require("torch")
gpt_oss = require("transformers.models.gpt_oss.modeling_gpt_oss")

BATCH, LENGTH, HEADS, KV_HEADS, DIM = 2, 40, 4, 2, 8


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((BATCH, LENGTH, HEADS, DIM)).astype(np.float32)
    k = rng.standard_normal((BATCH, LENGTH, KV_HEADS, DIM)).astype(np.float32)
    v = rng.standard_normal((BATCH, LENGTH, KV_HEADS, DIM)).astype(np.float32)
    sinks = (2.0 * rng.standard_normal(HEADS)).astype(np.float32)
    segments = np.zeros((BATCH, LENGTH), np.int32)
    segments[0, :17], segments[0, 17:18], segments[0, 18:35] = 1, 2, 3  # packed row, a 1-token segment, padding
    segments[1, :] = 1
    d_out = rng.standard_normal((BATCH, LENGTH, HEADS, DIM)).astype(np.float32)
    return q, k, v, sinks, segments, d_out


def torch_attention(q, k, v, sinks, segments, window):
    """transformers' gpt-oss eager attention with our mask as its additive mask; returns (out, grads)."""
    tq, tk, tv, ts = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v, sinks))
    mask = np.asarray(attention_mask(jnp.asarray(segments), causal=True, sliding_window=window))
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~torch.tensor(mask), -1e30)[:, None]
    module = types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, sinks=ts, training=False)
    out, _ = gpt_oss.eager_attention_forward(module, tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2),
                                             additive, scaling=DIM ** -0.5)
    return out, (tq, tk, tv, ts)


@pytest.mark.parametrize("implementation", ["reference", "xla_chunked"])
@pytest.mark.parametrize("window", [None, 7])
def test_sinks_match_transformers_gpt_oss_forward_and_gradients(implementation, window):
    q, k, v, sinks, segments, d_out = inputs()
    expected, leaves = torch_attention(q, k, v, sinks, segments, window)
    (expected * torch.tensor(d_out, dtype=torch.float64)).sum().backward()
    expected_grads = [leaf.grad.numpy() for leaf in leaves]

    options = dict(causal=True, sliding_window=window, implementation=implementation)
    if implementation == "xla_chunked":  # several tiles per row, so the online softmax runs across blocks
        from pallas_kernels.attention.xla_chunked import attention_xla_chunked

        def run(q, k, v, s):
            return attention_xla_chunked(q, k, v, jnp.asarray(segments), causal=True, sliding_window=window,
                                         sinks=s, block_q=8, block_k=16)
    else:
        def run(q, k, v, s):
            return attention(q, k, v, jnp.asarray(segments), sinks=s, **options)

    args = tuple(jnp.asarray(x) for x in (q, k, v, sinks))
    out, vjp = jax.vjp(run, *args)
    grads = vjp(jnp.asarray(d_out))
    assert norm_relative_error(out, expected.detach().numpy()) < 1e-5
    for name, got, want in zip("q k v sinks".split(), grads, expected_grads):
        assert norm_relative_error(got, want) < 1e-5, name
    # the sinks matter: without them the output differs
    plain = attention(*args[:3], jnp.asarray(segments), causal=True, sliding_window=window)
    assert norm_relative_error(plain, out) > 1e-2


def test_cache_attention_with_sinks_equals_whole_sequence_attention():
    q, k, v, sinks, _, _ = inputs(1)
    ones = jnp.ones((BATCH, LENGTH), jnp.int32)
    expected = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), ones, sinks=jnp.asarray(sinks),
                         sliding_window=9, implementation="reference")
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
    got = attention_over_cache(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), positions, sliding_window=9,
                               sinks=jnp.asarray(sinks))
    assert norm_relative_error(got, expected) < 1e-6


def test_sinks_are_refused_by_implementations_that_lack_them():
    q, k, v, sinks, segments, _ = inputs()
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segments))
    with pytest.raises(ValueError, match="'pallas_gpu_interpret' does not support attention sinks"):
        attention(*args, sinks=jnp.asarray(sinks), implementation="pallas_gpu_interpret")
    with pytest.raises(ValueError, match=r"one logit per query head, shape \(4,\)"):
        attention(*args, sinks=jnp.zeros(3), implementation="reference")
