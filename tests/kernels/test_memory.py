"""Temporary memory of the memory-efficient kernels vs the dense references, from XLA's compiled memory analysis.

Only compiles (never runs) forward+backward at realistic sizes. The loss uses float32 operands: XLA's CPU
backend upcasts a bfloat16 weight to float32 once, outside the loop, which is a CPU artifact (a 1 GB temporary
at vocab 128256) and not what the kernel does on an accelerator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.xla_chunked import attention_xla_chunked
from pallas_kernels.cross_entropy.reference import fused_linear_cross_entropy_reference
from pallas_kernels.cross_entropy.xla_chunked import fused_linear_cross_entropy_xla_chunked


def temp_bytes(fn, *shapes):
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_fused_cross_entropy_uses_at_most_5_percent_of_reference_temporaries():
    tokens, hidden_dim, vocab = 8192, 2048, 128256
    shapes = (jax.ShapeDtypeStruct((tokens, hidden_dim), jnp.float32),
              jax.ShapeDtypeStruct((hidden_dim, vocab), jnp.float32),
              jax.ShapeDtypeStruct((tokens,), jnp.int32),
              jax.ShapeDtypeStruct((tokens,), jnp.int32))

    def loss_grads(loss_fn):
        return jax.grad(lambda h, w, t, m: loss_fn(h, w, t, m).loss_sum, argnums=(0, 1))

    reference = temp_bytes(loss_grads(fused_linear_cross_entropy_reference), *shapes)
    chunked = temp_bytes(loss_grads(fused_linear_cross_entropy_xla_chunked), *shapes)
    assert reference > tokens * vocab * 4  # the reference really materializes the logits
    assert chunked <= 0.05 * reference, (chunked, reference)


def test_chunked_attention_uses_at_most_10_percent_of_reference_temporaries():
    batch, length, num_q_heads, num_kv_heads, head_dim = 1, 8192, 4, 1, 64
    q = jax.ShapeDtypeStruct((batch, length, num_q_heads, head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, length, num_kv_heads, head_dim), jnp.float32)
    segments = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def attention_grads(attention_fn):
        return jax.grad(lambda q, k, v, s: attention_fn(q, k, v, s).sum(), argnums=(0, 1, 2))

    reference = temp_bytes(attention_grads(attention_reference), q, kv, kv, segments)
    chunked = temp_bytes(attention_grads(attention_xla_chunked), q, kv, kv, segments)
    assert reference > num_q_heads * length * length * 4  # dense scores
    assert chunked <= 0.10 * reference, (chunked, reference)
