"""Linear (+ LoRA, against peft), RMSNorm (against transformers' Llama and Gemma norms), Embed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import require  # noqa: E402

torch = require("torch")
peft = require("peft")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sftjax.models.layers import Embed, Linear, RMSNorm  # noqa: E402
from tests.oracle import assert_close  # noqa: E402


def test_linear_matches_torch_layout_and_carries_logical_axes():
    layer = Linear(6, 4, use_bias=True, logical_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    assert layer.kernel.get_value().shape == (6, 4)
    assert layer.kernel.get_metadata()["logical_axes"] == ("embed", "mlp")
    assert layer.bias.get_metadata()["logical_axes"] == ("mlp",)
    torch_linear = torch.nn.Linear(6, 4)
    with torch.no_grad():
        torch_linear.weight.copy_(torch.tensor(np.asarray(layer.kernel.get_value()).T))
        torch_linear.bias.copy_(torch.randn(4))
    layer.bias.set_value(jnp.asarray(torch_linear.bias.detach().numpy()))
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    assert_close(np.asarray(layer(jnp.asarray(x))), torch_linear(torch.tensor(x)).detach().numpy(), 1e-6,
                 what="outputs")


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(rslora):
    rank, alpha = 4, 16.0
    layer = Linear(12, 10, rngs=nnx.Rngs(0))
    layer.enable_lora(rank, alpha, rslora=rslora, rngs=nnx.Rngs(1))
    assert layer.lora_scale == pytest.approx(alpha / math.sqrt(rank) if rslora else alpha / rank)
    a = np.asarray(layer.lora_a.get_value())
    assert a.shape == (12, rank) and np.abs(a).max() <= 1 / math.sqrt(12)  # kaiming-uniform(a=sqrt(5)) bound
    assert not np.any(np.asarray(layer.lora_b.get_value()))  # B starts at zero
    assert isinstance(layer.lora_a, nnx.LoRAParam) and isinstance(layer.lora_b, nnx.LoRAParam)
    b = np.random.default_rng(2).normal(size=(rank, 10)).astype(np.float32)
    layer.lora_b.set_value(jnp.asarray(b))

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 10, bias=False)

    base = Wrapper()
    with torch.no_grad():
        base.proj.weight.copy_(torch.tensor(np.asarray(layer.kernel.get_value()).T))
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"],
                                                           use_rslora=rslora, lora_dropout=0.0))
    with torch.no_grad():
        peft_model.base_model.model.proj.lora_A["default"].weight.copy_(torch.tensor(a.T))
        peft_model.base_model.model.proj.lora_B["default"].weight.copy_(torch.tensor(b.T))
    x = np.random.default_rng(3).normal(size=(5, 12)).astype(np.float32)
    expected = peft_model.base_model.model.proj(torch.tensor(x)).detach().numpy()
    assert_close(np.asarray(layer(jnp.asarray(x))), expected, 1e-6, what="outputs")
    merged = peft_model.merge_and_unload().proj.weight.detach().numpy().T
    assert_close(np.asarray(layer.merged_kernel()), merged, 1e-6, what="merged kernel")


def test_lora_dropout_only_when_not_deterministic():
    layer = Linear(8, 8, rngs=nnx.Rngs(0))
    layer.enable_lora(2, 2.0, dropout=0.5, rngs=nnx.Rngs(1))
    layer.lora_b.set_value(jnp.ones((2, 8)))
    x = jnp.ones((4, 8))
    assert np.allclose(layer(x), layer(x))
    assert not np.allclose(layer(x, deterministic=False), layer(x))


@pytest.mark.parametrize("plus_one", [False, True])
def test_rms_norm_matches_transformers(plus_one):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    weight = np.random.default_rng(0).normal(size=16).astype(np.float32)
    ours = RMSNorm(16, eps=1e-6, plus_one=plus_one)
    ours.weight.set_value(jnp.asarray(weight))
    reference = GemmaRMSNorm(16, eps=1e-6) if plus_one else LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(weight))
    x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype(np.float32)
    assert_close(np.asarray(ours(jnp.asarray(x))), reference(torch.tensor(x)).detach().numpy(), 1e-6, what="outputs")


def test_embed_lookup_and_scale():
    embed = Embed(10, 4, rngs=nnx.Rngs(0))
    table = np.asarray(embed.embedding.get_value())
    tokens = jnp.asarray([[1, 3, 3]])
    np.testing.assert_allclose(np.asarray(embed(tokens, scale=2.0)), table[[1, 3, 3]][None] * 2.0, atol=1e-7)
    assert embed(tokens, dtype=jnp.bfloat16).dtype == jnp.bfloat16
