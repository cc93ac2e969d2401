"""AOT compiles of the TPU kernels by XLA's real TPU compiler (Mosaic included), on libtpu's compile-only
devices: splash attention forward+backward and the Pallas TPU cross-entropy, each run per device inside
``shard_map`` by the apis (Mosaic kernels cannot be partitioned automatically).

Independent checks: the per-device argument bytes that ``memory_analysis()`` reports equal the bytes of each
device's shards computed from the shapes, and the loss's ``cost_analysis()`` FLOPs are those of its three
matmuls (forward logits, d_hidden, d_weight: 6 T D V per device) within 10% (plus elementwise work). The
attention's FLOPs are those of the XLA ops around splash only (the Mosaic kernel is not counted), a fact the
plan's roofline relies on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from pallas_kernels.attention.api import attention
from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy
from sftjax import accelerators
from tests.kernels.test_sharding import pallas_calls_and_maps

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "alias_size_in_bytes", "peak_memory_in_bytes")


def target_mesh(target, shape):
    devices = accelerators.tpu_topology_devices(target)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp", "tensor"),
                             axis_types=(AxisType.Auto,) * 3)


def nbytes(shape, dtype):
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def report(label, compiled):
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(f"{label}: " + ", ".join(f"{field}={getattr(memory, field)}" for field in MEMORY_FIELDS)
          + f"; flops={cost.get('flops'):.4g}, bytes accessed={cost.get('bytes accessed'):.4g}, "
            f"optimal_seconds={cost.get('optimal_seconds')}; cost keys={sorted(k for k in cost if '{' not in k)}")
    return memory, cost


def assert_every_pallas_call_mapped(fn, args):
    calls = pallas_calls_and_maps(jax.make_jaxpr(fn)(*args).jaxpr)
    assert len(calls) >= 2 and all(shard_map is not None for _, shard_map in calls)


@pytest.mark.parametrize("target, mesh_shape", [("v5p-8", (4, 1, 1)), ("v5e-8", (2, 2, 2))])
def test_splash_attention_forward_backward_compiles(libtpu, target, mesh_shape):
    mesh = target_mesh(target, mesh_shape)
    batch, length, q_heads, kv_heads, head_dim = 8, 1024, 8, 2, 128
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    q = jax.ShapeDtypeStruct((batch, length, q_heads, head_dim), jnp.bfloat16, sharding=heads)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16, sharding=heads)
    seg = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)

    def loss_and_grads(q, k, v, seg):
        def loss(q, k, v):
            return attention(q, k, v, seg, implementation="splash_tpu").astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    assert_every_pallas_call_mapped(loss_and_grads, (q, kv, kv, seg))
    compiled = jax.jit(loss_and_grads).lower(q, kv, kv, seg).compile()
    memory, cost = report(f"splash fwd+bwd on {target} {mesh_shape}", compiled)
    data, fsdp, tensor = mesh_shape
    local_rows = batch // (data * fsdp)
    local = (nbytes((local_rows, length, q_heads // tensor, head_dim), jnp.bfloat16)
             + 2 * nbytes((local_rows, length, kv_heads // tensor, head_dim), jnp.bfloat16))
    assert memory.argument_size_in_bytes == local + nbytes((local_rows, length), jnp.int32)
    assert memory.output_size_in_bytes >= local  # the three gradients (and the loss)
    assert memory.temp_size_in_bytes > 0
    # XLA's cost analysis does not see inside the Mosaic kernels (splash carries no cost estimate): its FLOPs
    # are only the XLA ops around them. A roofline must add the kernels' analytic FLOPs; if this starts to
    # fail, XLA counts them and that addition must go.
    causal_attention_flops = 0.5 * 4 * local_rows * length ** 2 * (q_heads // tensor) * head_dim * 3.5
    assert 0 < cost["flops"] < 0.01 * causal_attention_flops


@pytest.mark.parametrize("target, mesh_shape, vocab", [("v5p-8", (4, 1, 1), 32000), ("v5e-4", (2, 2, 1), 997),
                                                       ("v6e-8", (2, 2, 2), 151936)])
def test_pallas_tpu_cross_entropy_forward_backward_compiles(libtpu, target, mesh_shape, vocab):
    mesh = target_mesh(target, mesh_shape)
    batch, length, hidden = 8, 512, 1024
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    h = jax.ShapeDtypeStruct((batch, length, hidden), jnp.bfloat16, sharding=rows)
    w = jax.ShapeDtypeStruct((hidden, vocab), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", "tensor")))
    targets = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)

    def loss_and_grads(h, w, targets):
        def loss(h, w):
            return fused_linear_cross_entropy(h, w, targets, jnp.ones_like(targets),
                                              implementation="pallas_tpu").loss_sum
        return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

    assert_every_pallas_call_mapped(loss_and_grads, (h, w, targets))
    compiled = jax.jit(loss_and_grads).lower(h, w, targets).compile()
    memory, cost = report(f"pallas_tpu cross-entropy V={vocab} fwd+bwd on {target} {mesh_shape}", compiled)
    data, fsdp, tensor = mesh_shape
    local_tokens = batch * length // (data * fsdp * tensor)
    stored_weight = nbytes((hidden // fsdp, vocab // tensor if vocab % tensor == 0 else vocab), jnp.bfloat16)
    expected = nbytes((local_tokens * tensor, hidden), jnp.bfloat16) + stored_weight + nbytes((local_tokens * tensor,),
                                                                                          jnp.int32)
    # an odd vocabulary is stored padded to XLA's TPU tile along the lanes (at most 128 columns more)
    assert expected <= memory.argument_size_in_bytes <= expected + nbytes((hidden // fsdp, 128), jnp.bfloat16)
    matmul_flops = 6 * local_tokens * hidden * vocab
    assert matmul_flops <= cost["flops"] <= 1.1 * matmul_flops
