"""The MoE block against transformers' sparse MoE blocks (PyTorch CPU, float32, the same random weights), and its
grouped-matmul implementations against the dense-einsum oracle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftjax.errors import CheckpointError, ConfigError
from sftjax.models.moe import MoE, MoEAux, MoEConfig
from sftjax.models.moe_weights import (HF_WEIGHT_STYLE, module_params, moe_config_from_hf, moe_params_from_hf,
                                       moe_params_to_hf, set_module_params)
from tests.conftest import require
from tests.oracle import assert_close

torch = require("torch")

D, F, E, K = 16, 12, 4, 2
RTOL = 1e-5


@dataclasses.dataclass
class Family:
    name: str
    model_type: str
    style: str  # the weight layout of the transformers module's state dict
    hf_config: object
    block: torch.nn.Module


def _family(name: str) -> Family:
    from transformers import GptOssConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    common = dict(hidden_size=D, num_experts_per_tok=K, experts_implementation="eager")
    if name == "mixtral":
        cfg = MixtralConfig(intermediate_size=F, num_local_experts=E, **common)
        block, model_type = MixtralSparseMoeBlock(cfg), "mixtral"
    elif name.startswith("qwen3_moe"):
        cfg = Qwen3MoeConfig(moe_intermediate_size=F, num_experts=E, norm_topk_prob=name.endswith("norm"), **common)
        block, model_type = Qwen3MoeSparseMoeBlock(cfg), "qwen3_moe"
    elif name == "qwen2_moe":
        cfg = Qwen2MoeConfig(moe_intermediate_size=F, num_experts=E, shared_expert_intermediate_size=10,
                             norm_topk_prob=False, **common)
        block, model_type = Qwen2MoeSparseMoeBlock(cfg), "qwen2_moe"
    elif name == "gpt_oss":
        # a small clamp limit so that both clamps of the SwiGLU are active on these activations
        cfg = GptOssConfig(intermediate_size=F, num_local_experts=E, swiglu_limit=1.0, **common)
        block, model_type = GptOssMLP(cfg), "gpt_oss"
    else:
        raise ValueError(name)
    generator = torch.Generator().manual_seed(FAMILIES.index(name))
    with torch.no_grad():
        for pname, p in block.named_parameters():
            std = 1.0 if ("gate.weight" in pname or "router" in pname) else 0.3
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    block.eval()
    style = "gpt_oss" if model_type == "gpt_oss" else "fused"
    return Family(name, model_type, style, cfg, block)


def _ours(family: Family, implementation: str = "ragged_dot") -> MoE:
    config = moe_config_from_hf(family.hf_config, family.model_type, implementation=implementation)
    moe = MoE(config, rngs=nnx.Rngs(0))
    state = {k: v.detach().numpy() for k, v in family.block.state_dict().items()}
    set_module_params(moe, moe_params_from_hf(config, family.style, state))
    return moe


def _torch_router_logits(family: Family, x2d):
    router = family.block.router if family.model_type == "gpt_oss" else family.block.gate
    return router(x2d)[0]


def _torch_forward(family: Family, x):
    out = family.block(x)
    return out[0] if isinstance(out, tuple) else out


def _flat_grads(state) -> dict[str, np.ndarray]:
    return {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _torch_grads(family: Family, config: MoEConfig) -> dict[str, np.ndarray]:
    grads = {name: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32))
             for name, p in family.block.named_parameters()}
    for name, p in family.block.named_parameters():
        p.grad = None
    return moe_params_from_hf(config, family.style, grads)


FAMILIES = ["mixtral", "qwen3_moe_norm", "qwen3_moe", "qwen2_moe", "gpt_oss"]


@pytest.mark.parametrize("name", FAMILIES)
def test_block_matches_transformers(name):
    """Output, router logits, aux losses and every gradient equal transformers' block, all tokens real."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    family = _family(name)
    moe = _ours(family)
    config = moe.config
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((2, 5, D)).astype(np.float32)
    ct_np = rng.standard_normal((2, 5, D)).astype(np.float32)

    # reference: output and its gradients, then the aux loss and its gradients
    x_t = torch.tensor(x_np, requires_grad=True)
    y_t = _torch_forward(family, x_t)
    (y_t * torch.tensor(ct_np)).sum().backward()
    ref_grads, ref_gx = _torch_grads(family, config), x_t.grad.numpy().copy()
    x_t.grad = None
    logits_t = _torch_router_logits(family, x_t.reshape(-1, D))
    lb_t = load_balancing_loss_func((logits_t,), E, K)
    lb_t.backward()
    ref_lb_router = _torch_grads(family, config)["router.kernel"]
    ref_lb_gx = x_t.grad.numpy().copy()
    z_t = router_z_loss_func(logits_t.detach().reshape(2, 5, E))

    def output_loss(moe, x):
        y, _ = moe(x)
        return jnp.sum(y * ct_np), y

    (_, y), (g_moe, g_x) = nnx.value_and_grad(output_loss, argnums=(0, 1), has_aux=True)(moe, jnp.asarray(x_np))
    assert_close(y, y_t, RTOL, what=f"{name} output")
    assert_close(g_x, ref_gx, RTOL, what=f"{name} d/dx")
    grads = _flat_grads(g_moe)
    assert set(grads) == set(ref_grads)
    for path, ref in ref_grads.items():
        assert_close(grads[path], ref, RTOL, what=f"{name} d/d{path}")

    assert_close(moe.router(jnp.asarray(x_np.reshape(-1, D))), logits_t, RTOL, what=f"{name} router logits")

    def lb_loss(moe, x):
        _, aux = moe(x)
        total, count = aux.load_balancing()
        return total / count, aux

    (lb, aux), (g_moe, g_x) = nnx.value_and_grad(lb_loss, argnums=(0, 1), has_aux=True)(moe, jnp.asarray(x_np))
    assert_close(lb, lb_t, RTOL, what=f"{name} load-balancing loss")
    assert_close(_flat_grads(g_moe)["router.kernel"], ref_lb_router, RTOL, what=f"{name} d lb / d router")
    assert_close(g_x, ref_lb_gx, RTOL, what=f"{name} d lb / dx")
    z_sum, z_count = aux.z_loss()
    assert_close(z_sum / z_count, z_t, RTOL, what=f"{name} router z-loss")
    chosen = torch.topk(logits_t, K, dim=-1).indices.reshape(-1)
    np.testing.assert_array_equal(np.asarray(aux.expert_counts), np.bincount(chosen.numpy(), minlength=E))


def test_padding_is_excluded_and_layers_pool_like_transformers():
    """Two MoE layers of one forward with padding: the summed MoEAux gives transformers' load-balancing loss with
    its attention_mask (statistics pooled over layers), the z-loss of the real tokens only, and real tokens'
    outputs equal transformers'."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    family = _family("qwen3_moe_norm")
    moe = _ours(family)
    rng = np.random.default_rng(2)
    x1, x2 = (rng.standard_normal((2, 6, D)).astype(np.float32) for _ in range(2))
    segment_ids = np.array([[1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32)
    mask = torch.tensor(segment_ids != 0, dtype=torch.long)
    real = segment_ids.reshape(-1) != 0

    y_t = _torch_forward(family, torch.tensor(x1)).detach().numpy()
    logits = [_torch_router_logits(family, torch.tensor(x).reshape(-1, D)) for x in (x1, x2)]
    lb_t = load_balancing_loss_func(tuple(logits), E, K, mask)
    z_t = router_z_loss_func(torch.cat([l[torch.tensor(real)] for l in logits])[None].detach())

    y1, aux1 = moe(jnp.asarray(x1), jnp.asarray(segment_ids))
    _, aux2 = moe(jnp.asarray(x2), jnp.asarray(segment_ids))
    aux = aux1 + aux2
    lb_sum, lb_count = aux.load_balancing()
    z_sum, z_count = aux.z_loss()
    assert float(lb_count) == float(z_count) == real.sum()
    assert_close(lb_sum / lb_count, lb_t.detach(), RTOL, what="pooled load-balancing loss with padding")
    assert_close(z_sum / z_count, z_t, RTOL, what="z-loss over real tokens")
    y1 = np.asarray(y1).reshape(-1, D)
    assert_close(y1[real], y_t.reshape(-1, D)[real], RTOL, what="real tokens' output")
    assert np.all(y1[~real] == 0), "padding tokens are not routed"
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), aux1, aux2)
    assert_close(MoEAux.total(stacked).load_balancing()[0], lb_sum, 1e-6, what="MoEAux.total of stacked layers")
    with_dense_layer = aux + MoEAux.zeros(E)  # a dense layer adds nothing
    assert_close(with_dense_layer.load_balancing()[0], lb_sum, 1e-7, what="a dense layer's zero aux")
    assert float(with_dense_layer.token_count) == real.sum()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_checkpoint_layout_round_trip(tmp_path, model_type):
    """What transformers writes to disk (per-expert tensors for Mixtral/Qwen, fused for gpt-oss) maps to the same
    stacked arrays as its in-memory fused layout, and maps back to exactly the file's tensors."""
    import transformers
    from safetensors.numpy import load_file

    small = dict(vocab_size=32, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=8, num_experts_per_tok=K)
    if model_type == "mixtral":
        cfg, cls = transformers.MixtralConfig(intermediate_size=F, num_local_experts=E, **small), "MixtralForCausalLM"
        file_prefix = "model.layers.0.block_sparse_moe."
    elif model_type == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=F, moe_intermediate_size=F, num_experts=E,
                                          shared_expert_intermediate_size=10, **small)
        cls, file_prefix = "Qwen2MoeForCausalLM", "model.layers.0.mlp."
    elif model_type == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=F, moe_intermediate_size=F, num_experts=E, **small)
        cls, file_prefix = "Qwen3MoeForCausalLM", "model.layers.0.mlp."
    else:
        cfg, cls = transformers.GptOssConfig(intermediate_size=F, num_local_experts=E, **small), "GptOssForCausalLM"
        file_prefix = "model.layers.0.mlp."
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    in_memory = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = moe_config_from_hf(cfg, model_type)
    style = HF_WEIGHT_STYLE[model_type]
    block_disk = {k: v for k, v in on_disk.items() if k.startswith(file_prefix)}
    ours = moe_params_from_hf(config, style, block_disk, prefix=file_prefix)
    memory_style = "gpt_oss" if model_type == "gpt_oss" else "fused"
    block_memory = {k: v for k, v in in_memory.items() if k.startswith("model.layers.0.mlp.")}
    ours_memory = moe_params_from_hf(config, memory_style, block_memory, prefix="model.layers.0.mlp.")
    assert set(ours) == set(ours_memory)
    for path in ours:
        np.testing.assert_array_equal(ours[path], ours_memory[path], err_msg=path)
    back = moe_params_to_hf(config, style, ours, prefix=file_prefix)
    assert set(back) == set(block_disk)
    for name in back:
        np.testing.assert_array_equal(back[name], block_disk[name], err_msg=name)
    # a missing or unexpected tensor is a one-line error naming it
    missing = dict(block_disk)
    missing.pop(sorted(missing)[0])
    with pytest.raises(CheckpointError, match="missing tensor"):
        moe_params_from_hf(config, style, missing, prefix=file_prefix)


# ------------------------------------------------------------------------ implementations vs the dense oracle


def _skewed_moe(config: MoEConfig, *, lora: bool) -> MoE:
    """Random weights with a router that sends nothing to the last expert and most to expert 0."""
    moe = MoE(config, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(4)
    params = {path: rng.standard_normal(value.shape).astype(np.float32) * (1.0 if "router" in path else 0.3)
              for path, value in module_params(moe).items()}
    params["router.bias"] = np.array([3.0] + [0.0] * (config.num_experts - 2) + [-1e4], np.float32)
    set_module_params(moe, params)
    if lora:
        for proj in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            proj.enable_lora(3, 6.0, rngs=nnx.Rngs(5))
            proj.lora_b.set_value(jnp.asarray(rng.standard_normal(proj.lora_b[...].shape) * 0.2, jnp.float32))
    return moe


VARIANTS = {
    "swiglu": dict(activation="silu"),
    "gpt_oss": dict(activation="clamped_swiglu", expert_bias=True, router_order="topk_softmax",
                    norm_topk_prob=False, swiglu_limit=1.0),
    "shared_lora": dict(activation="silu", shared_expert_intermediate_size=8, shared_expert_gate=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_grouped_implementations_match_dense_oracle(variant):
    """ragged_dot and megablox (interpret mode) equal the dense einsum: outputs, aux losses and the gradients of
    every weight (LoRA factors included) and of the input, on a ragged routing with one expert receiving no token
    and padding rows."""
    config = MoEConfig(hidden_size=D, expert_intermediate_size=F, num_experts=5, num_experts_per_tok=K,
                       router_bias=True, **VARIANTS[variant])
    lora = variant == "shared_lora"
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((3, 7, D)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((3, 7, D)), jnp.float32)
    segment_ids = jnp.asarray([[1] * 7, [1, 1, 1, 2, 2, 0, 0], [1, 2, 3, 0, 0, 0, 0]], jnp.int32)

    def loss(moe, x):
        y, aux = moe(x, segment_ids)
        lb, count = aux.load_balancing()
        z, _ = aux.z_loss()
        return jnp.sum(y * ct) + (lb + 0.1 * z) / count, (y, aux)

    results = {}
    for implementation in ("dense", "ragged_dot", "megablox_interpret"):
        moe = _skewed_moe(config.replace(implementation=implementation), lora=lora)
        grad_fn = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (value, (y, aux)), (g_moe, g_x) = jax.jit(grad_fn)(moe, x)
        results[implementation] = (value, y, aux, _flat_grads(nnx.state(g_moe, nnx.Param)) |
                                   _flat_grads(nnx.state(g_moe, nnx.LoRAParam)), g_x)
    dense = results["dense"]
    assert float(dense[2].expert_counts[-1]) == 0.0 and float(dense[2].expert_counts[0]) > 0
    if not config.shared_expert_intermediate_size:
        padding = np.asarray(segment_ids).reshape(-1) == 0
        assert not np.any(np.asarray(dense[1]).reshape(-1, D)[padding]), "padding rows route nowhere"
    if lora:
        assert any(path.endswith("lora_a") for path in dense[3])
    for implementation in ("ragged_dot", "megablox_interpret"):
        value, y, aux, grads, g_x = results[implementation]
        assert_close(y, dense[1], RTOL, what=f"{implementation} output")
        assert_close(value, dense[0], RTOL, what=f"{implementation} loss")
        np.testing.assert_array_equal(np.asarray(aux.expert_counts), np.asarray(dense[2].expert_counts))
        assert_close(g_x, dense[4], RTOL, what=f"{implementation} d/dx")
        assert set(grads) == set(dense[3])
        for path, ref in dense[3].items():
            assert_close(grads[path], ref, RTOL, what=f"{implementation} d/d{path}")
        # the expert that received no token gets exactly zero gradient
        assert not np.any(grads["experts.down_proj.kernel"][-1])


def test_lora_experts_equal_merged_weights():
    """The ragged forward with per-expert adapters equals the plain model whose kernels are the merged ones."""
    config = MoEConfig(hidden_size=D, expert_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                       router_bias=True, implementation="ragged_dot")
    with_lora = _skewed_moe(config, lora=True)
    merged = _skewed_moe(config, lora=False)
    set_module_params(merged, module_params(with_lora, merge_lora=True))
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 5, D)), jnp.float32)
    assert_close(with_lora(x)[0], merged(x)[0], RTOL, what="LoRA experts vs merged kernels")
    assert_close(module_params(with_lora)["experts.up_proj.kernel"] - module_params(with_lora, merge_lora=False)[
        "experts.up_proj.kernel"], np.einsum("eri,ero->eio", with_lora.experts.up_proj.lora_a[...],
                                             with_lora.experts.up_proj.lora_b[...]) * 2.0, 1e-6,
        what="merged delta = scale * A_e @ B_e")


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5 is larger than model.moe.num_experts=4"),
    (dict(router_order="sigmoid"), "router_order='sigmoid' is not supported"),
    (dict(implementation="triton"), "implementation='triton' is not supported"),
    (dict(activation="swish"), "activation='swish' is not supported"),
    (dict(router_order="topk_softmax", norm_topk_prob=True), "norm_topk_prob=True has no meaning"),
    (dict(shared_expert_gate=True), "needs a shared expert"),
])
def test_bad_options_are_one_line_config_errors(changes, message):
    fields = dict(hidden_size=D, expert_intermediate_size=F, num_experts=E, num_experts_per_tok=K)
    with pytest.raises(ConfigError, match=message) as error:
        MoEConfig(**{**fields, **changes})
    assert "\n" not in str(error.value)


def test_expert_lora_dropout_and_jitter_are_refused():
    config = MoEConfig(hidden_size=D, expert_intermediate_size=F, num_experts=E, num_experts_per_tok=K)
    moe = MoE(config, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="lora.dropout=0.1 is not supported on expert weights"):
        moe.experts.gate_proj.enable_lora(4, 8.0, dropout=0.1, rngs=nnx.Rngs(1))
    from transformers import MixtralConfig

    with pytest.raises(ConfigError, match="router_jitter_noise=0.1 is not supported"):
        moe_config_from_hf(MixtralConfig(router_jitter_noise=0.1), "mixtral")


def test_automatic_implementation():
    from sftjax.models.moe import resolve_implementation

    assert resolve_implementation("auto", "tpu") == "megablox"
    assert resolve_implementation("auto", "cpu") == resolve_implementation("auto", "gpu") == "ragged_dot"
    assert resolve_implementation("dense", "tpu") == "dense"
