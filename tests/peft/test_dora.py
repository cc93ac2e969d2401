"""DoRA against peft (``LoraConfig(use_dora=True)``, float32): one Linear's magnitude init, forward, gradients and
merged weight, with and without LoRA dropout; the same on an NF4 base against peft on bitsandbytes' Linear4bit; a
tiny Llama with DoRA on every linear over two AdamW steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from sftjax.config import LoraSection
from sftjax.models.layers import Linear
from sftjax.peft.lora import apply_lora, linear_modules
from tests.oracle import assert_close
from tests.train.test_step import (
    adamw,
    build_step,
    make_examples,
    our_model_from_torch,
    pack_rows,
    tiny_model_config,
    steps_beside_torch,
    torch_llama,
)

IN, OUT, RANK, ALPHA = 12, 10, 4, 8.0


class _Wrapper(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT, bias=bias)


class _TorchMask(torch.nn.Module):
    """A fixed dropout mask (already scaled by 1/keep), so both sides drop the same inputs."""

    def __init__(self, mask):
        super().__init__()
        self.mask = torch.tensor(mask)

    def forward(self, x):
        return x * self.mask


class _JaxMask(nnx.Module):
    def __init__(self, mask):
        self.mask = jnp.asarray(mask)

    def __call__(self, x, *, deterministic: bool):
        return x if deterministic else x * self.mask


def _pair(bias=True, seed=0):
    rng = np.random.default_rng(seed)
    layer = Linear(IN, OUT, use_bias=bias, rngs=nnx.Rngs(0))
    w = rng.normal(size=(OUT, IN)).astype(np.float32) * 0.3
    layer.kernel[...] = jnp.asarray(w.T)
    base = _Wrapper(bias)
    with torch.no_grad():
        base.proj.weight.copy_(torch.from_numpy(w))
        if bias:
            b = rng.normal(size=OUT).astype(np.float32)
            base.proj.bias.copy_(torch.from_numpy(b))
            layer.bias[...] = jnp.asarray(b)
    layer.enable_lora(RANK, ALPHA, rngs=nnx.Rngs(1), use_dora=True, dropout=0.5)
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                                                      use_dora=True, lora_dropout=0.5))
    theirs = model.base_model.model.proj
    # the magnitude starts at the column norms of W (B = 0 on both sides)
    assert_close(layer.lora_magnitude[...], theirs.lora_magnitude_vector["default"].weight, 1e-6,
                 what="initial magnitude")
    # then the same non-trivial A, B and magnitude on both sides
    a = rng.normal(size=(IN, RANK)).astype(np.float32) * 0.3
    b = rng.normal(size=(RANK, OUT)).astype(np.float32) * 0.3
    m = np.asarray(layer.lora_magnitude[...]) * rng.uniform(0.5, 1.5, OUT).astype(np.float32)
    layer.lora_a[...], layer.lora_b[...], layer.lora_magnitude[...] = jnp.asarray(a), jnp.asarray(b), jnp.asarray(m)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(torch.from_numpy(a.T))
        theirs.lora_B["default"].weight.copy_(torch.from_numpy(b.T))
        theirs.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
    return layer, model, theirs


@pytest.mark.parametrize("with_dropout", [False, True])
def test_dora_linear_forward_and_gradients_match_peft(with_dropout):
    layer, model, theirs = _pair()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, IN)).astype(np.float32)
    cotangent = rng.normal(size=(6, OUT)).astype(np.float32)
    mask = (rng.random((6, IN)) < 0.5).astype(np.float32) * 2.0
    if with_dropout:
        layer.lora_dropout = _JaxMask(mask)
        theirs.lora_dropout["default"] = _TorchMask(mask)
        model.train()
    else:
        model.eval()

    graphdef, adapter, rest = nnx.split(layer, nnx.LoRAParam, ...)

    def ours(adapter, x):
        y = nnx.merge(graphdef, adapter, rest)(x, deterministic=not with_dropout)
        return jnp.sum(y * cotangent), y

    (_, y), (g_adapter, g_x) = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(adapter, jnp.asarray(x))
    x_t = torch.tensor(x, requires_grad=True)
    y_t = model.base_model.model.proj(x_t)
    (y_t * torch.from_numpy(cotangent)).sum().backward()
    assert_close(y, y_t, 1e-5, what="output")
    assert_close(g_x, x_t.grad, 1e-5, what="input gradient")
    assert_close(g_adapter["lora_a"][...], theirs.lora_A["default"].weight.grad.T, 1e-5, what="A gradient")
    assert_close(g_adapter["lora_b"][...], theirs.lora_B["default"].weight.grad.T, 1e-5, what="B gradient")
    assert_close(g_adapter["lora_magnitude"][...], theirs.lora_magnitude_vector["default"].weight.grad, 1e-5,
                 what="magnitude gradient")


def test_dora_without_dropout_module_equals_eval_path_and_merge_matches_peft():
    layer, model, _ = _pair()
    model.eval()
    x = np.random.default_rng(2).normal(size=(3, IN)).astype(np.float32)
    expected = model.base_model.model.proj(torch.from_numpy(x)).detach()
    assert_close(layer(jnp.asarray(x)), expected, 1e-5, what="eval output")
    merged = model.merge_and_unload().proj
    assert_close(layer.merged_kernel(), merged.weight.detach().numpy().T, 1e-6, what="merged kernel")
    # and folding in place gives a plain layer with the same output
    assert layer.fold_adapter() and layer.lora_magnitude is None
    assert_close(layer(jnp.asarray(x)), merged(torch.from_numpy(x)).detach(), 1e-5, what="folded output")


def _peft_layer(peft_model, name):
    _, index, group, proj = name.split(".")
    layer = peft_model.base_model.model.model.layers[int(index)]
    return getattr(getattr(layer, "self_attn" if group == "attn" else "mlp"), proj)


def test_dora_decoder_two_adamw_steps_match_peft():
    config = tiny_model_config()
    hf = torch_llama(config)
    lora = LoraSection(enabled=True, r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    model = our_model_from_torch(config, hf)
    names = apply_lora(model, lora, rngs=nnx.Rngs(1))
    for name in names:
        linear_modules(model)[name].enable_dora()
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                                         target_modules="all-linear"))
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for name in names:
            ours, theirs = linear_modules(model)[name], _peft_layer(peft_model, name)
            assert_close(ours.lora_magnitude[...], theirs.lora_magnitude_vector["default"].weight, 1e-6,
                         what=f"{name} initial magnitude")
            b = rng.normal(0, 0.1, ours.lora_b[...].shape).astype(np.float32)
            ours.lora_b[...] = jnp.asarray(b)
            theirs.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ours.lora_a[...]).T.copy()))
            theirs.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))
    examples = make_examples(0, 8)
    batch = pack_rows(examples, rows=4, per_row=2)
    step, state, frozen, graphdef = build_step(model, adamw(weight_decay=0.0), lora=lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 3 * len(names) == 3 * 14
    torch_opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    state = steps_beside_torch(step, state, frozen, batch, peft_model, torch_opt, examples)
    updated = nnx.merge(graphdef, state.params, frozen)
    for name in names:
        ours, theirs = linear_modules(updated)[name], _peft_layer(peft_model, name)
        assert_close(ours.lora_a[...], theirs.lora_A["default"].weight.T, 1e-5, what=f"{name} A")
        assert_close(ours.lora_b[...], theirs.lora_B["default"].weight.T, 1e-5, what=f"{name} B")
        assert_close(ours.lora_magnitude[...], theirs.lora_magnitude_vector["default"].weight, 1e-5,
                     what=f"{name} magnitude")


def test_qlora_dora_linear_matches_peft_on_a_bitsandbytes_linear4bit():
    """NF4 (double-quantized) base + DoRA against peft on bitsandbytes' Linear4bit: the magnitude starts at the
    norms of the *dequantized* weight, and forward and gradients agree."""
    import bitsandbytes as bnb

    in_features, out_features = 128, 16
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(out_features, in_features)) * 0.3).astype(np.float32)

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                                          quant_type="nf4", compress_statistics=True)

    base = Base()
    base.proj.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
    base = base.to("cpu")
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                                                      use_dora=True))
    model.train()  # (no dropout) in eval mode on AVX-512 CPUs Linear4bit repacks its weight for a bf16 kernel
    theirs = model.base_model.model.proj
    layer = Linear(in_features, out_features, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(w.T)
    layer.quantize("nf4", double_quant=True)
    layer.enable_lora(RANK, ALPHA, rngs=nnx.Rngs(1), use_dora=True)
    assert_close(layer.lora_magnitude[...], theirs.lora_magnitude_vector["default"].weight, 1e-6,
                 what="initial magnitude (dequantized weight)")
    a = rng.normal(size=(in_features, RANK)).astype(np.float32) * 0.1
    b = rng.normal(size=(RANK, out_features)).astype(np.float32) * 0.3
    layer.lora_a[...], layer.lora_b[...] = jnp.asarray(a), jnp.asarray(b)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(torch.from_numpy(a.T))
        theirs.lora_B["default"].weight.copy_(torch.from_numpy(b.T))
    x = rng.normal(size=(5, in_features)).astype(np.float32)
    cotangent = rng.normal(size=(5, out_features)).astype(np.float32)
    graphdef, adapter, rest = nnx.split(layer, nnx.LoRAParam, ...)

    def ours(adapter):
        y = nnx.merge(graphdef, adapter, rest)(jnp.asarray(x))
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(adapter)
    y_t = theirs(torch.from_numpy(x))
    (y_t * torch.from_numpy(cotangent)).sum().backward()
    assert_close(y, y_t, 1e-5, what="output")
    assert_close(grads["lora_a"][...], theirs.lora_A["default"].weight.grad.T, 1e-5, what="A gradient")
    assert_close(grads["lora_b"][...], theirs.lora_B["default"].weight.grad.T, 1e-5, what="B gradient")
    assert_close(grads["lora_magnitude"][...], theirs.lora_magnitude_vector["default"].weight.grad, 1e-5,
                 what="magnitude gradient")
