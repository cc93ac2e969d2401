"""Decoder behaviour that the family tests do not cover: remat policies, LoRA in the graph, head/hidden API,
segment isolation with sliding windows, and parameter metadata."""

from __future__ import annotations

import numpy as np
import pytest

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sftjax.models.config import ModelConfig  # noqa: E402
from sftjax.models.decoder import Decoder  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_position_embeddings=64, sliding_window=6,
                     layer_types=("sliding_attention", "full_attention"))
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 12)), jnp.int32)


def _loss(model):
    return jnp.mean(model(TOKENS) ** 2)


@pytest.fixture(scope="module")
def plain_loss_and_grads():
    return nnx.jit(nnx.value_and_grad(_loss))(Decoder(CONFIG, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("policy", ["full", "save_dots", "offload_dots"])
def test_remat_gives_identical_loss_and_gradients(policy, plain_loss_and_grads):
    remat = Decoder(CONFIG.replace(remat=policy), rngs=nnx.Rngs(0))
    assert remat.remat == policy
    loss_a, grads_a = plain_loss_and_grads
    loss_b, grads_b = nnx.jit(nnx.value_and_grad(_loss))(remat)
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        assert_close(np.asarray(b), np.asarray(a), 1e-5, what="gradient")


@pytest.mark.parametrize("scan", [False, True])
def test_offload_dots_keeps_matmul_outputs_in_host_memory(scan):
    """The residuals of offload_dots live in pinned host memory (jaxpr memory space <host>); save_dots keeps them
    on the device. (On the CPU both spaces are the same RAM, so only the program can show the difference.)"""
    from sftjax.models.scan import stack_layers

    def residual_spaces(remat):
        model = Decoder(CONFIG.replace(num_layers=4, layer_types=None, remat=remat), rngs=nnx.Rngs(0))
        if scan:
            stack_layers(model)
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(jax.grad(lambda s: _loss(nnx.merge(graphdef, s))))(state))

    assert "<host>" in residual_spaces("offload_dots")
    assert "<host>" not in residual_spaces("save_dots")


def test_offload_dots_without_pinned_host_memory_is_a_config_error(monkeypatch):
    from sftjax.errors import ConfigError
    from sftjax.models import decoder

    class DeviceWithoutHostMemory:
        def addressable_memories(self):
            return [type("Memory", (), {"kind": "device"})()]

    monkeypatch.setattr(decoder.jax, "devices", lambda *a: [DeviceWithoutHostMemory()])
    with pytest.raises(ConfigError, match="offload_dots needs pinned host memory"):
        decoder.remat_policy("offload_dots")


def test_logits_are_head_of_hidden_states_and_default_positions():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), TOKENS.shape)
    segments = jnp.ones(TOKENS.shape, jnp.int32)
    hidden = model.hidden_states(TOKENS, positions_BL=positions, segment_ids_BL=segments)
    assert hidden.shape == (2, 12, 32)
    assert model.head_weight().shape == (32, 64)
    logits = model(TOKENS, positions_BL=positions, segment_ids_BL=segments)
    assert logits.dtype == jnp.float32
    assert_close(np.asarray(logits), np.asarray(hidden @ model.head_weight()), 1e-6, what="logits")
    np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(logits), atol=0)  # defaults: one segment


def test_tied_head_is_the_embedding():
    model = Decoder(CONFIG.replace(tie_word_embeddings=True), rngs=nnx.Rngs(0))
    assert model.lm_head is None
    np.testing.assert_array_equal(np.asarray(model.head_weight()), np.asarray(model.embed_tokens.embedding[...]).T)


def test_tokens_of_another_segment_do_not_change_logits():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    segments = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    tokens = TOKENS[:1]
    changed = tokens.at[0, :5].set((tokens[0, :5] + 1) % 64)
    a = model(tokens, positions_BL=positions, segment_ids_BL=segments)
    b = model(changed, positions_BL=positions, segment_ids_BL=segments)
    assert_close(np.asarray(b[0, 5:]), np.asarray(a[0, 5:]), 1e-6, what="logits of the other segment")
    assert np.abs(np.asarray(a[0, :5] - b[0, :5])).max() > 1e-4


def test_sliding_window_layer_uses_window_and_full_layer_does_not():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    assert model.layers[0].attn.sliding_window == 6 and model.layers[1].attn.sliding_window is None
    # one all-sliding layer with window 3: position i sees tokens i-2..i only, so token 0 reaches positions 0..2
    one_layer = Decoder(CONFIG.replace(num_layers=1, layer_types=None, sliding_window=3), rngs=nnx.Rngs(0))
    changed = TOKENS.at[:, 0].set((TOKENS[:, 0] + 1) % 64)
    diff = np.abs(np.asarray(one_layer(TOKENS) - one_layer(changed))).max(axis=(0, 2))
    assert np.all(diff[:3] > 1e-5) and np.all(diff[3:] == 0)


def test_parameters_carry_logical_axes_and_lora_params_are_separate():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    axes = {".".join(map(str, path)): var.get_metadata()["logical_axes"]
            for path, var in nnx.to_flat_state(nnx.state(model))}
    assert axes["embed_tokens.embedding"] == ("vocab", "embed")
    assert axes["layers.0.attn.k_proj.kernel"] == ("embed", "kv_heads")
    assert axes["layers.1.mlp.down_proj.kernel"] == ("mlp", "embed")
    assert axes["lm_head.kernel"] == ("embed", "vocab")
    model.layers[0].attn.q_proj.enable_lora(2, 4.0, rngs=nnx.Rngs(1))
    lora_state = nnx.state(model, nnx.LoRAParam)
    assert {".".join(map(str, p)) for p, _ in nnx.to_flat_state(lora_state)} == {
        "layers.0.attn.q_proj.lora_a", "layers.0.attn.q_proj.lora_b"}
    before = model(TOKENS)
    model.layers[0].attn.q_proj.lora_b.set_value(jnp.ones((2, 32)))
    assert np.abs(np.asarray(model(TOKENS) - before)).max() > 1e-4
