"""LoRA initializations against peft's own (``init_lora_weights=``): PiSSA and OLoRA factors and residual base
weights on the same weights (up to the per-component sign, aligned here), gaussian's distribution, the Linear hook
and the one-line errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from sftjax.errors import ConfigError
from sftjax.models.layers import Linear
from sftjax.peft.init import gaussian, lora_init, olora, pissa
from tests.oracle import assert_close


class _Wrapper(torch.nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features, bias=False)


def _peft_init(w_OI, rank, alpha, init, rslora=False):
    """peft's (A [r, in], B [out, r], residual base [out, in], scale) for ``init_lora_weights=init``."""
    base = _Wrapper(w_OI.shape[1], w_OI.shape[0])
    with torch.no_grad():
        base.proj.weight.copy_(torch.from_numpy(w_OI))
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"],
                                                      init_lora_weights=init, use_rslora=rslora))
    layer = model.base_model.model.proj
    return (layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy(),
            layer.base_layer.weight.detach().numpy(), layer.scaling["default"])


def _align(b_ref_OR, a_ref_RI, b_OR):
    """peft's factors with each component's sign matched to ours (the only freedom of an SVD / QR)."""
    signs = np.sign(np.sum(b_ref_OR * b_OR, axis=0))
    return b_ref_OR * signs[None, :], a_ref_RI * signs[:, None]


@pytest.mark.parametrize("kind", ["pissa", "olora"])
@pytest.mark.parametrize("shape_OI,rank,rslora", [((16, 24), 4, False), ((24, 16), 6, True), ((12, 12), 12, False)])
def test_residual_inits_match_peft(kind, shape_OI, rank, rslora):
    w_OI = (np.random.default_rng(rank).normal(size=shape_OI) * 0.5).astype(np.float32)
    alpha = 8.0
    a_ref, b_ref, residual_ref, scale = _peft_init(w_OI, rank, alpha, kind, rslora)
    assert scale == pytest.approx(alpha / math.sqrt(rank) if rslora else alpha / rank)
    a_IR, b_RO, residual_IO = (pissa if kind == "pissa" else olora)(jnp.asarray(w_OI.T), rank, scale)
    a_RI, b_OR = np.asarray(a_IR).T, np.asarray(b_RO).T
    # our sign rule: the largest-magnitude entry of every B column is positive
    assert np.all(b_OR[np.argmax(np.abs(b_OR), axis=0), np.arange(rank)] > 0)
    b_ref, a_ref = _align(b_ref, a_ref, b_OR)
    # A and B are singular vectors scaled by sqrt(singular values): two float32 SVDs (LAPACK here, torch's in peft)
    # agree on them to ~eps / (relative gap between singular values), measured up to 1.4e-5 of the scale on these
    # random weights; the residual W - scale * B A inherits that difference, the reconstruction does not (1e-5).
    assert_close(b_OR, b_ref, 1e-4, what="B")
    assert_close(a_RI, a_ref, 1e-4, what="A")
    # the residual W - scale * B A carries W's rounding (it is ~0 at full rank): judged on W's scale
    residual_error = np.abs(np.asarray(residual_IO).T - residual_ref).max() / np.abs(w_OI).max()
    assert residual_error <= 1e-4, f"residual base: max |diff| is {residual_error:.3g} of W's scale"
    if rank < min(shape_OI):
        assert_close(np.asarray(residual_IO).T, residual_ref, 1e-4, what="residual base")
    # residual + scale * B A is the weight
    assert_close(np.asarray(residual_IO).T + scale * b_OR @ a_RI, w_OI, 1e-5, what="reconstruction")


def test_gaussian_matches_peft_distribution():
    rank, w_OI = 8, np.zeros((64, 4096), np.float32)
    a_ref, b_ref, _, scale = _peft_init(w_OI, rank, 16.0, "gaussian")
    a_IR, b_RO, residual = gaussian(jnp.asarray(w_OI.T), rank, scale, key=jax.random.key(0))
    assert residual is None and not np.any(np.asarray(b_RO)) and not np.any(b_ref)
    # 32768 samples each: the standard deviation is known to ~0.4%
    assert float(np.std(a_ref)) == pytest.approx(1 / rank, rel=0.03)
    assert float(np.std(np.asarray(a_IR))) == pytest.approx(1 / rank, rel=0.03)
    assert abs(float(np.mean(np.asarray(a_IR)))) < 0.01 / rank


def test_linear_hook_pissa_keeps_the_function_and_replaces_the_kernel():
    layer = Linear(24, 16, rngs=nnx.Rngs(0))
    w_IO = np.asarray(layer.kernel[...]).copy()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32))
    before = np.asarray(layer(x))
    layer.enable_lora(4, 8.0, rngs=nnx.Rngs(1), init="pissa", use_dora=True)
    a_IR, _, residual_IO = pissa(jnp.asarray(w_IO), 4, 2.0)
    np.testing.assert_array_equal(np.asarray(layer.kernel[...]), np.asarray(residual_IO))
    np.testing.assert_array_equal(np.asarray(layer.lora_a[...]), np.asarray(a_IR))
    assert_close(layer(x), before, 1e-5, what="output at init")
    assert_close(layer.lora_magnitude[...], np.linalg.norm(w_IO, axis=0), 1e-5, what="DoRA magnitude of W")


def test_default_init_is_unchanged():
    layer = Linear(12, 10, rngs=nnx.Rngs(0))
    layer.enable_lora(4, 8.0, rngs=nnx.Rngs(1))
    a, _, _ = lora_init("default", jax.ShapeDtypeStruct((12, 10), jnp.float32), 4, 2.0,
                        key=nnx.Rngs(1).params())
    np.testing.assert_array_equal(np.asarray(layer.lora_a[...]), np.asarray(a))
    assert np.abs(np.asarray(a)).max() <= 1 / math.sqrt(12) and not np.any(np.asarray(layer.lora_b[...]))


def test_init_errors():
    kernel = jnp.zeros((24, 16))
    with pytest.raises(ConfigError, match=r"lora.init=pissa: rank 17 exceeds the rank of layers.0.q's weight "
                                          r"\[in 24, out 16\] \(at most 16\)"):
        lora_init("pissa", kernel, 17, 1.0, key=None, name="layers.0.q")
    with pytest.raises(ConfigError, match="lora.init=olora: rank 20 exceeds"):
        lora_init("olora", kernel, 20, 1.0, key=None)
    with pytest.raises(ConfigError, match="lora.init='loftq' is not one of default, gaussian, pissa, olora"):
        lora_init("loftq", kernel, 4, 1.0, key=None)
    layer = Linear(64, 16, rngs=nnx.Rngs(0))
    layer.quantize("nf4")
    with pytest.raises(ConfigError, match="lora.init=pissa on the quantized proj: the residual must be computed"):
        layer.enable_lora(4, 8.0, rngs=nnx.Rngs(1), init="pissa", name="proj")
