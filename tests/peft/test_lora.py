"""LoRA as a state filter: parity with PEFT (torch), frozen weights untouched, adapter-sized optimizer state,
merged weights equal the adapted model, target selection errors."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from sftjax.config import LoraSection
from sftjax.errors import ConfigError
from sftjax.peft.lora import apply_lora, linear_modules, merge_lora, select_targets, split_model

from tests.train.test_step import (adamw, build_step, make_examples, our_model_from_torch, pack_rows,  # noqa: E402
                       tiny_model_config, torch_llama, assert_close_relative,
                       steps_beside_torch)

from tests.conftest import require  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

torch = require("torch")
peft = require("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_section(**changes) -> LoraSection:
    base = dict(enabled=True, r=4, alpha=8.0, dropout=0.0, rslora=False, target_modules=list(TARGETS))
    base.update(changes)
    return LoraSection(**base)


def adapted_model(config, hf, lora: LoraSection, seed=1):
    """Our model with adapters; B gets a non-zero value so the first step's gradients are not trivial."""
    model = our_model_from_torch(config, hf)
    names = apply_lora(model, lora, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for name in names:
        module = linear_modules(model)[name]
        module.lora_b[...] = jnp.asarray(rng.normal(0, 0.1, module.lora_b[...].shape).astype(np.float32))
    return model, names


def _peft_layer(peft_model, name):
    # our "layers.0.attn.q_proj" -> PEFT's base_model.model.model.layers[0].self_attn.q_proj
    _, index, group, proj = name.split(".")
    layer = peft_model.base_model.model.model.layers[int(index)]
    return getattr(getattr(layer, "self_attn" if group == "attn" else "mlp"), proj)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_step_matches_peft(rslora):
    config = tiny_model_config()
    hf = torch_llama(config)
    lora = lora_section(rslora=rslora)
    model, names = adapted_model(config, hf, lora)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora,
                                                         target_modules=TARGETS))
    assert sorted(n.split(".")[-1] for n in names) == sorted(TARGETS * 2)
    with torch.no_grad():
        for name in names:
            ours, theirs = linear_modules(model)[name], _peft_layer(peft_model, name)
            theirs.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ours.lora_a[...]).T.copy()))
            theirs.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ours.lora_b[...]).T.copy()))
            assert theirs.scaling["default"] == pytest.approx(ours.lora_scale)
    examples = make_examples(0, 8)
    batch = pack_rows(examples, rows=4, per_row=2)
    step, state, frozen, graphdef = build_step(model, adamw(weight_decay=0.0), lora=lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names)
    torch_opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    state = steps_beside_torch(step, state, frozen, batch, peft_model, torch_opt, examples)
    updated = nnx.merge(graphdef, state.params, frozen)
    for name in names:
        ours, theirs = linear_modules(updated)[name], _peft_layer(peft_model, name)
        assert_close_relative(ours.lora_a[...], theirs.lora_A["default"].weight.detach().numpy().T)
        assert_close_relative(ours.lora_b[...], theirs.lora_B["default"].weight.detach().numpy().T)


def test_frozen_weights_bit_identical_and_adapter_sized_optimizer_state(tmp_path):
    config = tiny_model_config()
    hf = torch_llama(config)
    lora = lora_section(target_modules="all-linear", modules_to_save=[])
    model, names = adapted_model(config, hf, lora)
    assert "lm_head" not in names and len(names) == 2 * 7
    step, state, frozen, graphdef = build_step(model, adamw(lr=1e-2, weight_decay=0.1), lora=lora,
                                               total_steps=20, max_grad_norm=1.0)
    frozen_before = jax.tree.map(np.asarray, nnx.state(nnx.merge(graphdef, state.params, frozen), nnx.Not(
        nnx.LoRAParam)))
    adapter_before = jax.tree.map(np.asarray, state.params)
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    for seed in range(20):
        batch = pack_rows(make_examples(seed, 8), rows=4, per_row=2)
        state, metrics = step(state, frozen, batch, jax.random.key(seed))
    final = nnx.merge(graphdef, state.params, frozen)
    frozen_after = nnx.state(final, nnx.Not(nnx.LoRAParam))
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(adapter_before), jax.tree.leaves(state.params)))
    for leaf in jax.tree.leaves(state.opt_state):
        assert leaf.ndim == 0 or leaf.shape in adapter_shapes, leaf.shape
    opt_elements = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt_elements == 2 * sum(x.size for x in jax.tree.leaves(state.params))  # Adam mu + nu only

    # merged export equals the adapted model (independent oracle: the adapted forward pass itself)
    tokens = jnp.asarray(batch["tokens"])
    kwargs = dict(positions_BL=jnp.asarray(batch["positions"]), segment_ids_BL=jnp.asarray(batch["segment_ids"]))
    adapted_logits = np.asarray(final(tokens, **kwargs))
    from sftjax.models.loading import load_model, save_model

    save_model(final, config, tmp_path / "merged")  # the trainer's train.save=merged path
    exported, _ = load_model(tmp_path / "merged")
    assert not jax.tree.leaves(nnx.state(exported, nnx.LoRAParam))
    assert_close(np.asarray(exported(tokens, **kwargs)), adapted_logits, 1e-5, what="exported logits")
    assert merge_lora(final) == len(names)
    assert not jax.tree.leaves(nnx.state(final, nnx.LoRAParam))
    assert_close(np.asarray(final(tokens, **kwargs)), adapted_logits, 1e-5, what="merged logits")


def test_modules_to_save_and_full_finetune_filters():
    config = tiny_model_config()
    hf = torch_llama(config)
    model, _ = adapted_model(config, hf, lora_section(modules_to_save=["embed_tokens", "lm_head"]))
    _, trainable, frozen = split_model(model, lora_section(modules_to_save=["embed_tokens", "lm_head"]))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert "embed_tokens/embedding" in paths and "lm_head/kernel" in paths
    assert "layers/0/attn/q_proj/lora_a" in paths and "layers/0/attn/q_proj/kernel" not in paths
    _, full, _ = split_model(our_model_from_torch(config, hf), LoraSection(enabled=False))
    assert len(nnx.to_flat_state(full)) == len(nnx.to_flat_state(nnx.state(our_model_from_torch(config, hf),
                                                                          nnx.Param)))


def test_target_errors_list_module_names():
    names = ["layers.0.attn.q_proj", "layers.0.mlp.up_proj", "lm_head"]
    assert select_targets(names, "all-linear") == names[:2]
    assert select_targets(names, ["q_proj", r"layers\.\d+\.mlp\..*"]) == names[:2]
    with pytest.raises(ConfigError) as info:
        select_targets(names, ["qkv_proj"])
    assert "'qkv_proj' matches no module" in str(info.value) and "q_proj, up_proj" in str(info.value)
    config = tiny_model_config()
    model = our_model_from_torch(config, torch_llama(config))
    with pytest.raises(ConfigError, match="modules_to_save entry 'embeddings_typo'"):
        apply_lora(model, lora_section(modules_to_save=["embeddings_typo"]), rngs=nnx.Rngs(0))


def test_lora_dropout_uses_the_step_rng():
    config = tiny_model_config()
    lora = lora_section(dropout=0.5)
    model, _ = adapted_model(config, torch_llama(config), lora)
    graphdef, trainable, frozen = split_model(model, lora)
    from sftjax.train.optim import make_optimizer
    from sftjax.train.step import LossOptions, TrainState, make_train_step

    tx, schedule = make_optimizer(adamw(), 10)
    step = make_train_step(graphdef, tx, schedule, LossOptions(dropout=True), donate=False)
    state = TrainState.create(trainable, tx)
    batch = pack_rows(make_examples(0, 8), rows=4, per_row=2)
    losses = [float(step(state, frozen, batch, jax.random.key(k))[1]["loss"]) for k in (0, 0, 1)]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    plain = make_train_step(graphdef, tx, schedule, LossOptions(dropout=False), donate=False)
    assert float(plain(state, frozen, batch, jax.random.key(0))[1]["loss"]) not in losses
