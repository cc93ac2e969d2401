"""LoRA on the experts of a tiny Qwen3-MoE and a tiny Gemma 4 MoE through the ordinary LoRA filter: per-expert
adapters train (nonzero gradients on every expert that received tokens), the frozen expert weights stay
bit-identical, the merged export loads in transformers and in sftjax with the LoRA model's logits, and so does the
PEFT adapter in peft; bad targets and adapter dropout on experts are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sftjax.config import LoraSection, OptimSection  # noqa: E402
from sftjax.errors import CheckpointError, ConfigError  # noqa: E402
from sftjax.models.loading import load_model, save_model  # noqa: E402
from sftjax.peft.adapter_io import lora_adapters, write_peft_adapter  # noqa: E402
from sftjax.peft.lora import apply_lora, split_model  # noqa: E402
from sftjax.train.optim import make_optimizer  # noqa: E402
from sftjax.train.step import LossOptions, TrainState, make_train_step  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

VOCAB, LENGTH, EXPERTS = 96, 16, 4
HF = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=EXPERTS, num_experts_per_tok=2,
          norm_topk_prob=True, router_aux_loss_coef=0.01, tie_word_embeddings=False, max_position_embeddings=64)
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=TARGETS)


# Gemma 4 (26B-A4B style): the dense MLP beside the experts on every layer, the experts on the layer itself
GEMMA4 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=EXPERTS, top_k_experts=2,
              enable_moe_block=True, hidden_size_per_layer_input=0, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
              max_position_embeddings=64)
FAMILIES = {"qwen3_moe": (transformers.Qwen3MoeConfig, HF, "mlp.gate.weight", "mlp.experts"),
            "gemma4": (transformers.Gemma4TextConfig, GEMMA4, "router.proj.weight", "experts")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    config_class, kwargs, router, _ = FAMILIES[request.param]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**kwargs)).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_((0.5 if name.endswith(router) else 0.05) * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    directory.joinpath("family").write_text(request.param)
    return directory


def _batch(seed=0, rows=4):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (rows, LENGTH)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones((rows, LENGTH), np.int32)
    mask[:, -1] = 0
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (rows, LENGTH))
    return {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": np.ones_like(tokens),
            "positions": np.array(positions)}


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_expert_adapters_train_and_the_frozen_experts_stay_bit_identical(checkpoint, tmp_path):
    model, config = load_model(checkpoint, dtype=jnp.float32)
    base = _flat(nnx.state(model, nnx.Param))
    targets = apply_lora(model, LORA, rngs=nnx.Rngs(params=1))
    for layer in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"layers.{layer}.mlp.experts.{proj}" in targets
    graphdef, trainable, frozen = split_model(model, LORA)
    trainable_paths = set(_flat(trainable))
    assert "layers.0.mlp.experts.gate_proj.lora_a" in trainable_paths
    assert not any(path.endswith("kernel") for path in trainable_paths)

    # the gradient of every expert's adapter factors (B is 0 at init, so A's gradient is 0 at step 0: take it
    # after one step)
    tx, schedule = make_optimizer(OptimSection(name="adamw", learning_rate=1e-2, schedule="constant"), 10)
    step = make_train_step(graphdef, tx, schedule, LossOptions(router_aux_loss_coef=0.01), donate=False)
    state = TrainState.create(trainable, tx)
    batch = _batch()
    state, metrics = step(state, frozen, batch, jax.random.key(0))
    assert all(float(metrics[f"expert_tokens_{e}"]) > 0 for e in range(EXPERTS))

    def loss(params):
        from sftjax.train.step import forward_loss

        result = forward_loss(graphdef, params, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, None,
                              LossOptions())
        return result.loss_sum / result.token_count

    grads = _flat(jax.grad(loss)(state.params))
    for layer in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for factor in ("lora_a", "lora_b"):
                g = grads[f"layers.{layer}.mlp.experts.{proj}.{factor}"]
                assert g.shape[0] == EXPERTS
                norms = np.linalg.norm(g.reshape(EXPERTS, -1), axis=1)
                assert np.all(norms > 0), f"layers.{layer} {proj}.{factor}: an expert's adapter has no gradient"
    for _ in range(2):
        state, metrics = step(state, frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    frozen_now = _flat(frozen)
    for path, value in base.items():  # every base weight, experts and router included, is untouched
        np.testing.assert_array_equal(frozen_now[path], value, err_msg=path)

    # merged export: transformers and sftjax both load it and give the LoRA model's logits
    nnx.update(model, state.params)
    tokens = jnp.asarray(_batch(seed=5, rows=2)["tokens"])
    want = np.asarray(model(tokens))
    assert not np.allclose(want, np.asarray(load_model(checkpoint, dtype=jnp.float32)[0](tokens)), atol=1e-4)
    save_model(model, config, tmp_path / "merged")
    reloaded, _ = load_model(tmp_path / "merged", dtype=jnp.float32)
    assert_close(reloaded(tokens), want, 1e-5, what="logits of the reloaded merged export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(torch.tensor(np.asarray(tokens), dtype=torch.long), use_cache=False).logits
    assert_close(logits, want, 1e-5, what="transformers logits of the merged export")

    # the PEFT adapter (target_parameters on the fused expert tensors) gives the same logits in peft
    peft = require("peft")
    write_peft_adapter(model, config, tmp_path / "adapter", lora={"r": LORA.r, "alpha": LORA.alpha, "rslora": False},
                       base_model_name_or_path=str(checkpoint))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    experts = FAMILIES[checkpoint.joinpath("family").read_text()][3]
    assert adapter_config["target_parameters"] == [f"{experts}.gate_up_proj", f"{experts}.down_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        peft_logits = peft_model(torch.tensor(np.asarray(tokens), dtype=torch.long), use_cache=False).logits
    assert_close(peft_logits, want, 1e-5, what="peft logits of the exported adapter")
    with torch.no_grad():
        merged = peft_model.merge_and_unload()(torch.tensor(np.asarray(tokens), dtype=torch.long),
                                               use_cache=False).logits
    assert_close(merged, want, 1e-5, what="peft merge_and_unload logits")
    with pytest.raises(CheckpointError, match="per-expert LoRA adapters .* have no PEFT adapter form") as error:
        lora_adapters(model, config)  # the per-module table alone cannot hold them
    assert "\n" not in str(error.value)


def test_attention_only_adapters_still_export_to_peft(checkpoint):
    model, config = load_model(checkpoint, dtype=jnp.float32)
    apply_lora(model, LoraSection(enabled=True, r=2, alpha=4.0, target_modules=["q_proj"]), rngs=nnx.Rngs(1))
    adapters = lora_adapters(model, config)
    assert sorted(adapters) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("lora, message", [
    (LoraSection(enabled=True, target_modules=["experts.w1"]), "'experts.w1' matches no module"),
    (LoraSection(enabled=True, target_modules=[r".*experts\.gate_up_proj"]), "matches no module"),
    (LoraSection(enabled=True, dropout=0.1, target_modules=["gate_proj"]),
     "lora.dropout=0.1 is not supported on expert weights"),
])
def test_bad_expert_targets_are_one_line_errors(checkpoint, lora, message):
    model, _ = load_model(checkpoint, dtype=jnp.float32)
    with pytest.raises(ConfigError, match=message) as error:
        apply_lora(model, lora, rngs=nnx.Rngs(1))
    assert "\n" not in str(error.value)
    assert "MoE expert projections are stacked, e.g. layers.0.mlp.experts." in str(error.value) or "dropout" in message
