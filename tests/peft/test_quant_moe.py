"""QLoRA on mixture-of-experts models: the stacked experts quantized one bitsandbytes tensor per expert.

Each expert's ``[out, in]`` matrix against bitsandbytes' own round trip (bit for bit); a tiny Qwen3-MoE loaded with
``quantize=`` against transformers running the checkpoint with every attention and expert weight replaced by that
round trip; LoRA gradients (experts and attention) against the dense model holding the round trip; expert
parallelism on 8 fake devices against one device; no dense copy of the experts in the compiled gradient; frozen
arrays bit-identical through train steps; merged and PEFT exports in transformers and peft."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")
require("bitsandbytes")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sftjax.config import LoraSection, OptimSection  # noqa: E402
from sftjax.errors import ConfigError  # noqa: E402
from sftjax.models.loading import load_model, save_model  # noqa: E402
from sftjax.models.moe import MoE, ExpertLinear, MoEConfig  # noqa: E402
from sftjax.models.quant import QuantizedExpertWeight, QuantizedKernel  # noqa: E402
from sftjax.peft.adapter_io import write_peft_adapter  # noqa: E402
from sftjax.peft.lora import apply_lora, linear_modules, split_model  # noqa: E402
from sftjax.peft.quant import quantize_model, quantized_param_count  # noqa: E402
from sftjax.train.optim import make_optimizer  # noqa: E402
from sftjax.train.step import LossOptions, TrainState, forward_loss, make_train_step  # noqa: E402
from tests.oracle import assert_close  # noqa: E402
from tests.peft.test_quant import _bits, _bnb_round_trip_IO  # noqa: E402

VOCAB, LENGTH, EXPERTS, F = 96, 16, 4, 96
# hidden 64: q/k/v/o and the experts' gate/up are tiled (in % 64 == 0); the experts' down (in 96) is flat
HF = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=F, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=EXPERTS, num_experts_per_tok=2,
          norm_topk_prob=True, router_aux_loss_coef=0.01, tie_word_embeddings=False, max_position_embeddings=64)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=TARGETS)
FORMATS = [("nf4", False), ("nf4", True), ("int8", False)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**HF)).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_((0.5 if name.endswith("mlp.gate.weight") else 0.05) * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp("qwen3_moe_qlora")
    model.save_pretrained(directory)
    return directory


def _tokens(seed=5, rows=2):
    return np.random.default_rng(seed).integers(3, VOCAB, (rows, LENGTH)).astype(np.int32)


def _batch(seed=0, rows=4):
    tokens = _tokens(seed, rows)
    mask = np.ones((rows, LENGTH), np.int32)
    mask[:, -1] = 0
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask,
            "segment_ids": np.ones_like(tokens),
            "positions": np.array(np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (rows, LENGTH)))}


def _round_trip_OI(w_OI, fmt, double_quant):
    return np.ascontiguousarray(_bnb_round_trip_IO(np.asarray(w_OI).T, fmt, double_quant).T)


def _hf_holding_round_trip(directory, fmt, double_quant):
    """transformers' model of ``directory`` with each attention weight and each expert's gate, up and down
    matrix replaced by bitsandbytes' dequantize(quantize(W)); router, embeddings, norms and head untouched."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ATTENTION:
                weight = getattr(layer.self_attn, name).weight
                weight.copy_(torch.from_numpy(_round_trip_OI(weight.numpy(), fmt, double_quant)))
            gate_up, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj  # [E, 2F, D], [E, D, F]
            for e in range(EXPERTS):
                for rows in (slice(0, F), slice(F, 2 * F)):
                    gate_up[e, rows].copy_(torch.from_numpy(_round_trip_OI(gate_up[e, rows].numpy(), fmt,
                                                                           double_quant)))
                down[e].copy_(torch.from_numpy(_round_trip_OI(down[e].numpy(), fmt, double_quant)))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()


def _expert_modules(model) -> dict[str, ExpertLinear]:
    return {name: m for name, m in linear_modules(model).items() if isinstance(m, ExpertLinear)}


# ------------------------------------------------------------------------------------------------ storage


@pytest.mark.parametrize("fmt,double_quant", FORMATS)
@pytest.mark.parametrize("in_features", [128, 96])  # tiled / flat per expert
def test_each_expert_is_its_own_bitsandbytes_tensor(fmt, double_quant, in_features):
    experts, out_features = 3, 64
    layer = ExpertLinear(experts, in_features, out_features, use_bias=False,
                         logical_axes=("expert", "embed", "mlp"), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    kernel = (np.random.default_rng(1).normal(size=(experts, in_features, out_features)) * 0.05).astype(np.float32)
    kernel[1] *= 7.0  # experts of very different scales: per-expert absmax and offsets
    layer.kernel[...] = jnp.asarray(kernel)
    layer.quantize(fmt, double_quant=double_quant)
    assert isinstance(layer.kernel, QuantizedExpertWeight) and layer.quantized
    dequantized = np.asarray(jax.jit(lambda m: m.base_kernel())(layer))
    for e in range(experts):
        np.testing.assert_array_equal(_bits(dequantized[e]),
                                      _bits(_bnb_round_trip_IO(kernel[e], fmt, double_quant)), err_msg=f"expert {e}")
    # bitsandbytes' storage per expert, counted by hand, with the expert axis first on every array
    n = in_features * out_features
    if fmt == "int8":
        per_expert = n + 4 * out_features
    elif double_quant:
        per_expert = n // 2 + -(-n // 64) + 4 * -(-(-(-n // 64)) // 256) + 4
    else:
        per_expert = n // 2 + 4 * -(-n // 64)
    assert layer.kernel.nbytes() == experts * per_expert
    stored = layer.kernel.stored()
    assert all(value.shape[0] == experts for value in stored.values())
    if fmt == "nf4" and in_features % 64 == 0:
        assert stored["codes"].shape == (experts, out_features, in_features // 2)
    assert layer.kernel_dtype == jnp.float32 and layer.kernel_shape == (experts, in_features, out_features)


@pytest.mark.parametrize("fmt,double_quant", FORMATS)
def test_load_model_quantized_moe_computes_the_model_holding_the_round_trip(checkpoint, fmt, double_quant):
    """``load_model(quantize=)`` on a Qwen3-MoE: logits of transformers running the round trip of every attention
    and expert weight, through the grouped matmul and through the dense oracle; the router stays a float param."""
    reference = _hf_holding_round_trip(checkpoint, fmt, double_quant)
    tokens = _tokens()
    model, config = load_model(checkpoint, quantize=fmt, double_quant=double_quant)
    want = _hf_logits(reference, tokens)
    assert_close(model(jnp.asarray(tokens)), want, 1e-5, what=f"{fmt} grouped-matmul logits")
    for layer in model.layers:
        layer.mlp.config = dataclasses.replace(layer.mlp.config, implementation="dense")
    assert_close(model(jnp.asarray(tokens)), want, 1e-5, what=f"{fmt} dense-oracle logits")

    experts = _expert_modules(model)
    assert len(experts) == 2 * 3 and all(m.quantized for m in experts.values())
    assert all(isinstance(layer.mlp.router.kernel, nnx.Param) for layer in model.layers)
    params = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert sorted(k for k, v in params.items() if v.ndim >= 2) == [
        "embed_tokens/embedding", "layers/0/mlp/router/kernel", "layers/1/mlp/router/kernel", "lm_head/kernel"]
    # every expert weight counts once in the dense parameter count
    dense_count = 2 * (2 * 64 * 64 + 2 * 64 * 32 + EXPERTS * 3 * 64 * F)  # q, o; k, v (2 kv heads); experts
    assert quantized_param_count(model) == dense_count


# ------------------------------------------------------------------------------------------------ training


def _adapted(checkpoint, fmt, double_quant):
    """(quantized + LoRA, dense holding the bitsandbytes round trip + the same LoRA), adapters nonzero."""
    models = []
    for quantize in (True, False):
        model, _ = load_model(checkpoint, dtype=jnp.float32)
        apply_lora(model, LORA, rngs=nnx.Rngs(params=1))
        rng = np.random.default_rng(2)
        for module in linear_modules(model).values():
            if module.lora_b is not None:
                module.lora_b[...] = jnp.asarray(rng.normal(0, 0.1, module.lora_b[...].shape).astype(np.float32))
        if quantize:
            quantize_model(model, fmt, double_quant=double_quant)
        else:
            for name, module in linear_modules(model).items():
                if isinstance(module, ExpertLinear):
                    kernel = np.asarray(module.kernel[...])
                    module.kernel[...] = jnp.asarray(np.stack([_bnb_round_trip_IO(kernel[e], fmt, double_quant)
                                                               for e in range(EXPERTS)]))
                elif name.split(".")[-1] in ATTENTION:
                    module.kernel[...] = jnp.asarray(_bnb_round_trip_IO(module.kernel[...], fmt, double_quant))
        models.append(model)
    return models


def _loss_and_grads(model, batch):
    graphdef, trainable, frozen = split_model(model, LORA)

    def loss(params):
        result = forward_loss(graphdef, params, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, None,
                              LossOptions(router_aux_loss_coef=0.01))
        return result.loss_sum / result.token_count

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    return value, {"/".join(map(str, p)): np.asarray(g[...]) for p, g in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("fmt,double_quant", [("nf4", True), ("int8", False)])
def test_qlora_moe_gradients_equal_the_dense_model_holding_the_round_trip(checkpoint, fmt, double_quant):
    quantized, dense = _adapted(checkpoint, fmt, double_quant)
    batch = _batch()
    loss_q, grads_q = _loss_and_grads(quantized, batch)
    loss_d, grads_d = _loss_and_grads(dense, batch)
    assert_close(loss_q, loss_d, 1e-5, what="loss")
    assert sorted(grads_q) == sorted(grads_d)
    assert any("experts/down_proj/lora_a" in path for path in grads_q)
    for path in grads_d:
        assert_close(grads_q[path], grads_d[path], 1e-5, what=path)


def test_quantized_experts_stay_bit_identical_through_train_steps(checkpoint):
    quantized, _ = _adapted(checkpoint, "nf4", True)
    graphdef, trainable, frozen = split_model(quantized, LORA)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(trainable))
    before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(quantized, QuantizedKernel))]
    tx, schedule = make_optimizer(OptimSection(name="adamw", learning_rate=1e-2, schedule="constant"), 10)
    step = make_train_step(graphdef, tx, schedule, LossOptions(router_aux_loss_coef=0.01), donate=False)
    state = TrainState.create(trainable, tx)
    losses = []
    for seed in range(3):  # one batch, so that the loss can only fall by learning
        state, metrics = step(state, frozen, _batch(0), jax.random.key(seed))
        losses.append(float(metrics["loss"]))
    after = jax.tree.leaves(nnx.state(nnx.merge(graphdef, state.params, frozen), QuantizedKernel))
    assert len(before) == len(after) and before
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ sharding


def _moe_block(fmt):
    config = MoEConfig(hidden_size=64, expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                       router_aux_loss_coef=0.01, implementation="ragged_dot")
    moe = MoE(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    moe.router.kernel[...] = jnp.asarray(rng.normal(size=moe.router.kernel[...].shape).astype(np.float32))
    for proj in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
        proj.kernel[...] = jnp.asarray(rng.normal(0, 0.1, proj.kernel[...].shape).astype(np.float32))
        proj.enable_lora(2, 4.0, rngs=nnx.Rngs(2))
        proj.lora_b[...] = jnp.asarray(rng.normal(0, 0.2, proj.lora_b[...].shape).astype(np.float32))
        proj.quantize(fmt, double_quant=fmt == "nf4")
    return moe


def _moe_grads(moe, x, segment_ids, ct):
    def loss(lora, x):
        y, aux = nnx.merge(graphdef, lora, rest)(x, segment_ids)
        lb, count = aux.load_balancing()
        return jnp.sum(y * ct) + lb / count

    graphdef, lora, rest = nnx.split(moe, nnx.LoRAParam, ...)
    value, (g_lora, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(lora, x)
    return value, {"/".join(map(str, p)): np.asarray(g[...]) for p, g in nnx.to_flat_state(g_lora)}, np.asarray(g_x)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1), (2, 2, 2)])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_experts_split_over_devices_equal_one_device(fmt, mesh_shape):
    from jax.sharding import NamedSharding, PartitionSpec

    from sftjax.models.moe_sharding import EXPERT_RULES
    from sftjax.sharding import make_mesh, shard_model

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(8, 8, 64)).astype(np.float32))
    ct = jnp.asarray(rng.normal(size=(8, 8, 64)).astype(np.float32))
    segment_ids = jnp.asarray(np.where(np.arange(8)[None, :] < 6, 1, 0).repeat(8, 0).astype(np.int32))
    want = _moe_grads(_moe_block(fmt), x, segment_ids, ct)

    moe = _moe_block(fmt)
    mesh = make_mesh(*mesh_shape)
    shard_model(moe, mesh, EXPERT_RULES)
    codes = moe.experts.up_proj.kernel.codes[...]
    assert codes.sharding.spec[0] == "fsdp"  # experts split, each rank's codes whole
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
    got = _moe_grads(moe, jax.device_put(x, rows), jax.device_put(segment_ids, NamedSharding(
        mesh, PartitionSpec(("data", "fsdp"), None))), jax.device_put(ct, rows))
    assert_close(got[0], want[0], 1e-5, what="loss")
    assert_close(got[2], want[2], 1e-5, what="input gradient")
    for path, g in want[1].items():
        assert_close(got[1][path], g, 1e-5, what=path)


def test_quantized_experts_hold_no_dense_copy_in_the_scanned_gradient():
    """Compiled memory (XLA's memory analysis, CPU) of the LoRA gradient of a scanned 4-layer MoE: the NF4 experts
    take their codes' bytes as arguments and no more temporary memory than the dense model (autodiff through the
    dequantization would keep every layer's dense experts as a scan residual)."""
    from sftjax.models.decoder import Decoder
    from sftjax.models.registry import config_from_hf
    from sftjax.models.scan import stack_layers

    hf = dict(HF, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=256, head_dim=32,
              intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=4, num_experts=8,
              num_attention_heads=8, num_key_value_heads=8)
    config = config_from_hf(hf)
    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    tokens = jnp.ones((2, 64), jnp.int32)
    memory, logits = {}, {}
    for fmt in ("none", "nf4"):
        model = Decoder(config, rngs=nnx.Rngs(0))
        apply_lora(model, lora, rngs=nnx.Rngs(1))
        if fmt != "none":
            quantize_model(model, fmt)
        unscanned = np.asarray(model(tokens[:, :16]))
        stack_layers(model)
        graphdef, trainable, frozen = split_model(model, lora)
        logits[fmt] = (unscanned, np.asarray(nnx.merge(graphdef, trainable, frozen)(tokens[:, :16])))

        def loss(trainable, frozen, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, trainable, frozen)(tokens))

        memory[fmt] = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().memory_analysis()
    assert_close(logits["nf4"][1], logits["nf4"][0], 1e-5, what="scanned vs unscanned NF4 logits")
    dense, nf4 = memory["none"], memory["nf4"]
    assert nf4.argument_size_in_bytes < 0.25 * dense.argument_size_in_bytes
    assert nf4.temp_size_in_bytes <= 1.05 * dense.temp_size_in_bytes, (nf4.temp_size_in_bytes, dense.temp_size_in_bytes)


# ------------------------------------------------------------------------------------------------ export


def test_qlora_moe_exports_merged_and_as_a_peft_adapter(checkpoint, tmp_path):
    """The merged export is the dequantized base plus the adapters (transformers gives our logits); the PEFT
    adapter, on transformers' model holding the round trip (what bitsandbytes' base computes), gives them too."""
    quantized, _ = _adapted(checkpoint, "nf4", False)
    tokens = _tokens()
    want = np.asarray(quantized(jnp.asarray(tokens)))
    _, config = load_model(checkpoint, dtype=jnp.float32)
    write_peft_adapter(quantized, config, tmp_path / "adapter", lora={"r": LORA.r, "alpha": LORA.alpha,
                                                                      "rslora": False},
                       base_model_name_or_path=str(checkpoint))
    save_model(quantized, config, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    assert_close(_hf_logits(merged, tokens), want, 1e-5, what="transformers logits of the merged QLoRA export")
    peft = require("peft")
    base = _hf_holding_round_trip(checkpoint, "nf4", False)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert_close(_hf_logits(peft_model, tokens), want, 1e-5, what="peft logits on the round-trip base")


def test_quantized_expert_refusals_are_one_line(checkpoint):
    model, _ = load_model(checkpoint, quantize="nf4")
    with pytest.raises(ConfigError) as error:
        quantize_model(model, "int8")
    assert str(error.value).startswith("quantize_model: layers.0.") and "is already quantized (nf4)" in str(error.value)
    only_experts = load_model(checkpoint)[0]
    only_experts.layers[1].mlp.experts.down_proj.quantize("int8")
    with pytest.raises(ConfigError, match=r"^quantize_model: layers\.1\.mlp\.experts\.down_proj is already "
                                          r"quantized \(int8\)$"):
        quantize_model(only_experts, "nf4")
    assert "\n" not in str(error.value)
    with pytest.raises(TypeError, match="grouped matmul"):
        model.layers[0].mlp.experts.up_proj.kernel.matmul(jnp.ones((2, 64)))
