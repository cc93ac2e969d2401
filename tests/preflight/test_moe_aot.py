"""The MoE block's forward and backward compiled by XLA's TPU compiler through megablox (Mosaic kernels), on
libtpu's compile-only v5p devices, on one chip and with the experts split over 4: with per-expert LoRA (rank 16,
narrower than a TPU lane: the backward matmuls need tiles of their own shapes), with NF4-quantized experts under
those adapters (QLoRA on experts), and as Gemma 4's block. The experts' LoRA A gradient comes out in its stored
``[E, r, in]`` layout, never with r on the 128-lane axis (which XLA chose when megablox's own VJP transposed
it)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from sftjax import accelerators
from sftjax.models.moe import MoE, MoEConfig
from sftjax.models.moe_sharding import EXPERT_RULES
from sftjax.sharding import MESH_AXES, partition_spec

D, F, E, K, R = 512, 256, 8, 2, 16


def _compiled(config: MoEConfig, mesh_shape, quantize: str | None):
    devices = accelerators.tpu_topology_devices("v5p-8")[:int(np.prod(mesh_shape))]
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(mesh_shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)

    def build():
        moe = MoE(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        for proj in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            if quantize:
                proj.quantize(quantize, double_quant=True)
            proj.enable_lora(R, 2.0 * R, rngs=nnx.Rngs(1))
        return moe

    graphdef, state = nnx.split(nnx.eval_shape(build))

    def sharded(variable):
        value = variable.get_value()
        spec = partition_spec(variable.get_metadata().get("logical_axes"), value.shape, mesh, EXPERT_RULES)
        return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))

    state = jax.tree.map(sharded, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    lora, rest = nnx.split_state(state, nnx.LoRAParam, ...)
    rows = ("data", "fsdp")
    x = jax.ShapeDtypeStruct((8, 512, D), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(rows, None, None)))
    seg = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec(rows, None)))

    def loss(lora, rest, x, seg):
        y, aux = nnx.merge(graphdef, lora, rest)(x, seg)
        lb, count = aux.load_balancing()
        return jnp.sum(y.astype(jnp.float32)) + lb / count

    return jax.jit(jax.grad(loss, argnums=(0, 2))).lower(lora, rest, x, seg).compile()


VARIANTS = {
    "plain": {},
    # Gemma 4's block: the dense MLP as shared expert, both branches between their own norms, router scales
    "gemma4": dict(activation="gelu_tanh", shared_expert_intermediate_size=2 * F, branch_norms=True,
                   router_input_scale=True, per_expert_scale=True),
}


@pytest.mark.parametrize("quantize, variant", [(None, "plain"), ("nf4", "plain"), (None, "gemma4")],
                         ids=["bf16_experts", "nf4_experts", "gemma4_block"])
@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 4, 1)], ids=["one_chip", "experts_over_4"])
def test_expert_lora_compiles_through_megablox_for_tpu(libtpu, mesh_shape, quantize, variant):
    config = MoEConfig(hidden_size=D, expert_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                       implementation="megablox", **VARIANTS[variant])
    compiled = _compiled(config, mesh_shape, quantize)
    text = compiled.as_text()
    assert text.count("tpu_custom_call") >= 6, "the grouped matmuls are not megablox kernels"
    if mesh_shape[1] > 1:
        assert "all-to-all" in text
    # no [.., in, r=16] buffer laid out with r minor (dims listed minor-first after the shape)
    experts = E // mesh_shape[1]
    for width in (D, F):
        for layout in re.findall(rf"\[{experts},{width},{R}\]\{{(\d+),", text):
            assert layout != "2", f"an [{experts}, {width}, {R}] buffer has the rank on the lane axis"
    memory = compiled.memory_analysis()
    print(f"{quantize or 'bf16'} experts, mesh {mesh_shape}: temp {memory.temp_size_in_bytes}, "
          f"arguments {memory.argument_size_in_bytes}")
    assert memory.temp_size_in_bytes > 0
