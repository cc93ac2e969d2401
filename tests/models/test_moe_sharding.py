"""Expert parallelism on 8 fake CPU devices equals one device: outputs, aux losses and every gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sftjax.errors import ConfigError
from sftjax.models.moe import MoE, MoEConfig
from sftjax.models.moe_sharding import EXPERT_RULES, check_expert_mesh
from sftjax.models.moe_weights import module_params, set_module_params
from sftjax.sharding import make_mesh, shard_model
from tests.oracle import assert_close

D, F = 16, 8
RTOL = 1e-5

CONFIGS = {
    # Qwen2-MoE-like: shared expert with its gate, per-expert LoRA on all three projections
    "shared_lora": MoEConfig(hidden_size=D, expert_intermediate_size=F, num_experts=8, num_experts_per_tok=2,
                             shared_expert_intermediate_size=8, shared_expert_gate=True, norm_topk_prob=False,
                             router_aux_loss_coef=0.01, router_z_loss_coef=0.001, implementation="ragged_dot"),
    # Gemma 4-like: the dense branch and the experts each between their own norms, the router's input and
    # per-expert scales
    "gemma4": MoEConfig(hidden_size=D, expert_intermediate_size=F, num_experts=8, num_experts_per_tok=2,
                        activation="gelu_tanh", shared_expert_intermediate_size=12, router_input_scale=True,
                        per_expert_scale=True, branch_norms=True, router_aux_loss_coef=0.01,
                        router_z_loss_coef=0.001, implementation="ragged_dot"),
    # gpt-oss-like: router and expert biases, top-k then softmax, clamped SwiGLU, k > experts per device
    "gpt_oss": MoEConfig(hidden_size=D, expert_intermediate_size=F, num_experts=8, num_experts_per_tok=4,
                         router_order="topk_softmax", norm_topk_prob=False, router_bias=True, expert_bias=True,
                         activation="clamped_swiglu", swiglu_limit=1.0, implementation="ragged_dot"),
}


def _model(config: MoEConfig) -> MoE:
    moe = MoE(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    set_module_params(moe, {path: rng.standard_normal(v.shape).astype(np.float32) * (1.0 if "router" in path else 0.3)
                            for path, v in module_params(moe).items()})
    if config.shared_expert_intermediate_size:
        for proj in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            proj.enable_lora(2, 4.0, rngs=nnx.Rngs(2))
            proj.lora_b.set_value(jnp.asarray(rng.standard_normal(proj.lora_b[...].shape) * 0.2, jnp.float32))
    return moe


def _loss(moe: MoE, x, segment_ids, ct):
    y, aux = moe(x, segment_ids)
    lb, count = aux.load_balancing()
    z, _ = aux.z_loss()
    return jnp.sum(y * ct) + (lb + 0.1 * z) / count, (y, lb, z, count, aux.expert_counts)


def _run(config, mesh_shape, x, segment_ids, ct, *, row_axes=("data", "fsdp")):
    moe = _model(config)
    if mesh_shape is not None:
        mesh = make_mesh(*mesh_shape)
        shard_model(moe, mesh, EXPERT_RULES)
        x, ct = (jax.device_put(a, NamedSharding(mesh, PartitionSpec(row_axes, None, None))) for a in (x, ct))
        segment_ids = jax.device_put(segment_ids, NamedSharding(mesh, PartitionSpec(row_axes, None)))
    compiled = jax.jit(nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True)).lower(moe, x, segment_ids,
                                                                                        ct).compile()
    (value, extras), (g_moe, g_x) = compiled(moe, x, segment_ids, ct)
    grads = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g_moe)
             if hasattr(v.get_value(), "shape")}
    return value, extras, grads, g_x, compiled.as_text()


_ONE_DEVICE = {}


def _one_device(name, config, x, segment_ids, ct):
    if name not in _ONE_DEVICE:
        _ONE_DEVICE[name] = _run(config, None, x, segment_ids, ct)
    return _ONE_DEVICE[name]


def _inputs(batch, length, seed=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, length, D)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((batch, length, D)), jnp.float32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[1, length // 2:] = 2
    segment_ids[-1, -3:] = 0  # padding
    return x, jnp.asarray(segment_ids), ct


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mesh_shape", [(4, 2, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)],
                         ids=["ep2", "ep4", "ep8", "ep2_tensor2"])
def test_expert_parallel_equals_one_device(name, mesh_shape):
    config = CONFIGS[name]
    x, segment_ids, ct = _inputs(8, 6)
    ref = _one_device(name, config, x, segment_ids, ct)
    out = _run(config, mesh_shape, x, segment_ids, ct)
    assert "all-to-all" in out[4], "the experts were not exchanged with all_to_all"
    assert_close(out[0], ref[0], RTOL, what="loss")
    for got, want, what in zip(out[1], ref[1], ("output", "load-balancing sum", "z-loss sum", "tokens", "counts")):
        assert_close(got, want, RTOL, what=what)
    assert_close(out[3], ref[3], RTOL, what="d/dx")
    assert set(out[2]) == set(ref[2])
    assert any("lora_b" in p for p in ref[2]) == bool(config.shared_expert_intermediate_size)  # see _model
    for path, want in ref[2].items():
        assert_close(out[2][path], want, RTOL, what=f"d/d{path}")


def test_tokens_not_divisible_by_the_expert_axis_and_megablox():
    """6 tokens on fsdp=4: the rows are split over data only and replicated over the expert axis (every rank
    exchanges the same tokens); megablox (interpret mode) inside the map gives the same as one device."""
    config = CONFIGS["gpt_oss"].replace(implementation="megablox_interpret")
    x, segment_ids, ct = _inputs(2, 3, seed=5)
    ref = _run(config, None, x, segment_ids, ct)
    out = _run(config, (2, 4, 1), x, segment_ids, ct, row_axes="data")
    assert "all-to-all" in out[4]
    assert_close(out[0], ref[0], RTOL, what="loss")
    assert_close(out[1][0], ref[1][0], RTOL, what="output")
    assert_close(out[3], ref[3], RTOL, what="d/dx")
    for path, want in ref[2].items():
        assert_close(out[2][path], want, RTOL, what=f"d/d{path}")


def test_expert_count_not_divisible_by_the_expert_axis_is_a_config_error():
    config = MoEConfig(hidden_size=D, expert_intermediate_size=F, num_experts=6, num_experts_per_tok=2)
    mesh = make_mesh(2, 4, 1)
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by the expert-parallel mesh axis fsdp=4"):
        check_expert_mesh(config, mesh)
    moe = MoE(config, rngs=nnx.Rngs(0))
    shard_model(moe, mesh, EXPERT_RULES)
    x = jax.device_put(jnp.ones((8, 2, D)), NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None)))
    with pytest.raises(ConfigError, match="not divisible by the expert-parallel mesh axis") as error:
        jax.jit(lambda m, x: m(x)[0])(moe, x)
    assert "\n" not in str(error.value)


def test_expert_rules_keep_experts_whole_on_their_rank():
    """With the expert rule the stacked weights split over fsdp on the expert axis and stay whole along embed."""
    from sftjax.sharding import variable_sharding

    mesh = make_mesh(2, 4, 1)
    moe = MoE(CONFIGS["gpt_oss"], rngs=nnx.Rngs(0))
    spec = variable_sharding(moe.experts.gate_proj.kernel, mesh, EXPERT_RULES).spec
    assert tuple(spec)[:2] == ("fsdp", None)
    assert tuple(variable_sharding(moe.experts.down_proj.kernel, make_mesh(2, 2, 2), EXPERT_RULES).spec) == (
        "fsdp", "tensor", None)
    assert tuple(variable_sharding(moe.router.kernel, mesh, EXPERT_RULES).spec) == ("fsdp", None)
