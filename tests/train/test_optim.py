"""Optimizers and schedules against closed-form values (numpy) and PyTorch's optimizers, and the weight-decay mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftjax.config import OptimSection
from sftjax.train.optim import decay_mask, make_optimizer, make_schedule
from tests.conftest import require
from tests.oracle import assert_close


def section(**changes) -> OptimSection:
    return OptimSection(**changes)  # validated at construction


def test_schedules_match_closed_form():
    peak, total, warmup = 1e-3, 100, 10
    cosine = make_schedule(section(learning_rate=peak, schedule="cosine", warmup_steps=warmup, min_lr_ratio=0.1),
                           total)
    linear = make_schedule(section(learning_rate=peak, schedule="linear", warmup_ratio=0.1), total)
    constant = make_schedule(section(learning_rate=peak, schedule="constant"), total)
    for step in (0, 5, 10, 37, 99, 100):
        if step < warmup:
            expected_cos = expected_lin = peak * step / warmup
        else:
            frac = (step - warmup) / (total - warmup)
            expected_cos = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            expected_lin = peak * (1 - frac)
        assert float(cosine(step)) == pytest.approx(expected_cos, rel=1e-5, abs=1e-12)
        assert float(linear(step)) == pytest.approx(expected_lin, rel=1e-5, abs=1e-12)
        assert float(constant(step)) == pytest.approx(peak)


def test_weight_decay_skips_norms_biases_embeddings():
    params = {"embed_tokens": {"embedding": jnp.ones((4, 2))}, "norm": {"weight": jnp.ones((2,))},
              "proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    mask = decay_mask(params, OptimSection().no_decay)
    assert mask == {"embed_tokens": {"embedding": False}, "norm": {"weight": False},
                    "proj": {"kernel": True, "bias": False}}
    lr, wd = 0.1, 0.5
    tx, _ = make_optimizer(section(learning_rate=lr, schedule="constant", weight_decay=wd), total_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # numpy AdamW, first step: m_hat = g, v_hat = g^2 -> adam = g / (|g| + eps); decay only where masked in
    adam = 1.0 / (1.0 + 1e-8)
    np.testing.assert_allclose(updates["proj"]["kernel"], -lr * (adam + wd * 1.0), rtol=1e-5)  # float32 bias correction (1 - 0.999)
    for leaf in (updates["proj"]["bias"], updates["norm"]["weight"], updates["embed_tokens"]["embedding"]):
        np.testing.assert_allclose(leaf, -lr * adam, rtol=1e-5)  # float32 bias correction (1 - 0.999)


def test_sgd_update():
    params = {"proj": {"kernel": jnp.full((4, 4), 2.0)}}
    grads = {"proj": {"kernel": jnp.full((4, 4), 0.5)}}
    tx, _ = make_optimizer(section(name="sgd", learning_rate=0.1, schedule="constant", momentum=0.9), 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["proj"]["kernel"], -0.1 * 0.5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adafactor_matches_torch_adafactor(weight_decay):
    """optim.name=adafactor against ``torch.optim.Adafactor`` over several steps with gradients of changing scale.

    Under these settings the two are the same algorithm: second-moment decay 1 - t^-0.8; the second moment of a
    matrix factored into row and column means (optax factors once both dimensions reach 128, torch always), of a
    vector kept whole; the normalized update clipped to RMS 1, scaled by max(RMS(param), 1e-3) and by the learning
    rate (torch's min(lr, 1/sqrt(t)) is lr while lr <= 1/sqrt(t)); decoupled weight decay param *= 1 - lr * wd,
    skipped where ``optim.no_decay`` matches (the bias here)."""
    torch = require("torch")
    lr, steps = 0.1, 5
    rng = np.random.default_rng(0)
    start = {"proj": {"kernel": rng.normal(0.0, 0.5, (128, 144)).astype(np.float32),
                      "bias": rng.normal(0.0, 0.1, (144,)).astype(np.float32)}}
    grads = [{"proj": {"kernel": (rng.normal(size=(128, 144)) * rng.uniform(0.1, 3.0, (128, 1)) * scale
                                  ).astype(np.float32),
                       "bias": (rng.normal(size=(144,)) * scale).astype(np.float32)}}
             for scale in (1.0, 0.2, 5.0, 1.0, 0.05)][:steps]

    tx, _ = make_optimizer(section(name="adafactor", learning_rate=lr, schedule="constant",
                                   weight_decay=weight_decay), steps)
    params = jax.tree.map(jnp.asarray, start)
    state = tx.init(params)
    kernel = torch.nn.Parameter(torch.tensor(start["proj"]["kernel"]))
    bias = torch.nn.Parameter(torch.tensor(start["proj"]["bias"]))
    reference = torch.optim.Adafactor([{"params": [kernel], "weight_decay": weight_decay},
                                       {"params": [bias], "weight_decay": 0.0}], lr=lr, beta2_decay=-0.8,
                                      eps=(None, 1e-3), d=1.0)
    for step, grad in enumerate(grads, start=1):
        updates, state = tx.update(jax.tree.map(jnp.asarray, grad), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        kernel.grad, bias.grad = torch.tensor(grad["proj"]["kernel"]), torch.tensor(grad["proj"]["bias"])
        reference.step()
        # compare how far each weight has moved from the start, relative to the largest such move
        for name, theirs in (("kernel", kernel), ("bias", bias)):
            moved = np.asarray(params["proj"][name]) - start["proj"][name]
            # float32 rounding of the weights themselves is ~3e-6 of these moves
            assert_close(moved, theirs.detach().numpy() - start["proj"][name], 2e-5, what=f"step {step} {name}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_loraplus_two_adamw_steps_match_peft_create_loraplus_optimizer(weight_decay):
    """LoRA+ (``lora.lr_ratio``): B at lr x ratio, A at lr, against peft's optimizer on the same tiny model."""
    peft = require("peft")
    torch = require("torch")
    from flax import nnx
    from peft.optimizers import create_loraplus_optimizer

    from sftjax.config import LoraSection
    from sftjax.peft.lora import apply_lora, linear_modules, split_model
    from sftjax.train.step import LossOptions, TrainState, make_train_step
    from tests.train.test_step import (
        make_examples,
        our_model_from_torch,
        pack_rows,
        steps_beside_torch,
        tiny_model_config,
        torch_llama,
    )

    lr, ratio = 1e-3, 16.0
    config = tiny_model_config()
    hf = torch_llama(config)
    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules="all-linear", lr_ratio=ratio)
    model = our_model_from_torch(config, hf)
    names = apply_lora(model, lora, rngs=nnx.Rngs(1))
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules="all-linear"))
    rng = np.random.default_rng(1)

    def peft_layer(name):
        _, index, group, proj = name.split(".")
        layer = peft_model.base_model.model.model.layers[int(index)]
        return getattr(getattr(layer, "self_attn" if group == "attn" else "mlp"), proj)

    start_b = {}
    with torch.no_grad():  # B != 0 so that A gets a gradient in the first step
        for name in names:
            ours, theirs = linear_modules(model)[name], peft_layer(name)
            b = rng.normal(0, 0.1, ours.lora_b[...].shape).astype(np.float32)
            ours.lora_b[...] = jnp.asarray(b)
            start_b[name] = b
            theirs.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ours.lora_a[...]).T.copy()))
            theirs.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))
    # no_decay=[]: every adapter decays, as peft's groups (its decay_parameters leave out only norms and biases)
    optim = section(learning_rate=lr, schedule="constant", weight_decay=weight_decay, no_decay=[])
    graphdef, trainable, frozen = split_model(model, lora)
    tx, schedule = make_optimizer(optim, 10, lr_ratio=ratio)
    step = make_train_step(graphdef, tx, schedule, LossOptions())
    state = TrainState.create(trainable, tx)
    torch_opt = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=weight_decay, weight_decay=weight_decay,
                                          betas=(0.9, 0.999), eps=1e-8)
    assert sorted(g["lr"] for g in torch_opt.param_groups if g["params"]) == [lr, lr * ratio]
    examples = make_examples(0, 8)
    batch = pack_rows(examples, rows=4, per_row=2)
    state = steps_beside_torch(step, state, frozen, batch, peft_model, torch_opt, examples)
    updated = nnx.merge(graphdef, state.params, frozen)
    for name in names:
        ours, theirs = linear_modules(updated)[name], peft_layer(name)
        assert_close(ours.lora_a[...], theirs.lora_A["default"].weight.T, 1e-5, what=f"{name} A")
        assert_close(ours.lora_b[...], theirs.lora_B["default"].weight.T, 1e-5, what=f"{name} B")
    moved = np.abs(np.asarray(linear_modules(updated)[names[0]].lora_b[...]) - start_b[names[0]])
    assert moved.max() > 10 * lr  # two Adam steps move at most ~2 lr without the ratio


def test_loraplus_mask_selects_lora_b_and_vectors():
    from sftjax.train.optim import loraplus_mask

    params = {"layers": {"0": {"q_proj": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 4)),
                                          "lora_magnitude": jnp.zeros((4,))}}}, "lm_head": {"kernel": jnp.zeros((4, 4))}}
    mask = loraplus_mask(params)
    assert mask["layers"]["0"]["q_proj"] == {"lora_a": False, "lora_b": True, "lora_magnitude": True}
    assert mask["lm_head"]["kernel"] is False
