"""Gemma 4's mixture-of-experts layers (26B-A4B style: the dense MLP and the routed experts side by side) against
transformers, beyond the family suite's checks (tests/models/test_families.py, case ``gemma4_moe``): every
gradient, the experts', the router's scales and the branch norms included; the load-balancing loss of the
router's logits against transformers' own ``load_balancing_loss_func`` (Gemma 4 computes none itself, but a
run may add it), padding excluded; scanned layers equal unscanned; greedy generation through the KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy  # noqa: E402
from sftjax.models.loading import load_model  # noqa: E402
from sftjax.models.scan import stack_layers  # noqa: E402
from tests.models.hf_reference import flat, gradients_in_our_layout, masked_cross_entropy  # noqa: E402
from tests.models.test_families import LENGTH, _batch, _make_hf_model  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

CASE = "gemma4_moe"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf_model = _make_hf_model(CASE)
    directory = tmp_path_factory.mktemp(CASE)
    hf_model.save_pretrained(directory)
    return hf_model, directory


def test_config_reads_the_moe_block(checkpoint):
    hf_model, directory = checkpoint
    model, config = load_model(directory, dtype=jnp.float32)
    moe = config.moe
    assert config.moe_layers == tuple(range(4))
    assert (moe.num_experts, moe.num_experts_per_tok, moe.expert_intermediate_size) == (4, 2, 16)
    assert moe.shared_expert_intermediate_size == hf_model.config.intermediate_size and not moe.shared_expert_gate
    assert moe.branch_norms and moe.router_input_scale and moe.per_expert_scale and moe.norm_topk_prob
    assert moe.activation == "gelu_tanh" and moe.router_aux_loss_coef == 0.0
    assert all(layer.mlp_norm is None for layer in model.layers)  # the block norms its own inputs


def test_every_gradient_matches_transformers(checkpoint, tmp_path):
    hf_model, directory = checkpoint
    model, config = load_model(directory, dtype=jnp.float32)
    tokens, targets, mask = _batch(seed=1)

    def loss_fn(m):
        hidden = m.hidden_states(jnp.asarray(tokens))
        result = fused_linear_cross_entropy(hidden, m.head_weight(), jnp.asarray(targets), jnp.asarray(mask),
                                            logit_softcap=config.final_logit_softcap)
        return result.loss_sum / result.token_count

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    hf_model.zero_grad()
    ref_loss = masked_cross_entropy(hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits,
                                    targets, mask)
    ref_loss.backward()
    assert_close(float(loss), float(ref_loss.detach()), 1e-5, what="loss")
    ref = gradients_in_our_layout(hf_model, lambda: _make_hf_model(CASE), tmp_path / "grads")
    ours = flat(grads)
    assert set(ours) == set(ref)
    for part in ("experts.gate_proj.kernel", "experts.down_proj.kernel", "router.scale", "router.per_expert_scale",
                 "experts_out_norm.weight", "shared_expert_norm.weight", "shared_expert.up_proj.kernel"):
        assert f"layers.3.mlp.{part}" in ours, part
    for path, want in ref.items():
        assert_close(ours[path], want, 5e-5, what=f"d loss / d {path}")


def test_load_balancing_loss_matches_transformers_on_the_router_logits(checkpoint):
    """The router's logits (rms-normed, scaled input) through transformers' load_balancing_loss_func, with the
    right-padded tail masked: our MoEAux over the same tokens (segment id 0 on the padding)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf_model, directory = checkpoint
    model, config = load_model(directory, dtype=jnp.float32)
    tokens, _, _ = _batch(seed=2)
    attention_mask = np.ones(tokens.shape, np.int64)
    attention_mask[1, LENGTH - 5:] = 0
    captured = []
    hooks = [layer.router.proj.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
             for layer in hf_model.model.layers]
    try:
        with torch.no_grad():
            hf_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(attention_mask),
                     use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == config.num_layers
    want = load_balancing_loss_func(tuple(captured), config.moe.num_experts, config.moe.num_experts_per_tok,
                                    torch.tensor(attention_mask))
    _, aux = nnx.jit(lambda m, t, s: m(t, segment_ids_BL=s, return_aux=True))(
        model, jnp.asarray(tokens), jnp.asarray(attention_mask.astype(np.int32)))
    lb_sum, count = aux.load_balancing()
    assert float(count) == attention_mask.sum()
    assert_close(lb_sum / count, float(want), 1e-5, what="load-balancing loss")
    assert float(jnp.sum(aux.expert_counts)) == attention_mask.sum() * config.num_layers * 2


def test_scanned_layers_equal_unscanned(checkpoint):
    _, directory = checkpoint
    model, _ = load_model(directory, dtype=jnp.float32)
    scanned, _ = load_model(directory, dtype=jnp.float32)
    stack_layers(scanned)
    tokens = jnp.asarray(_batch(seed=3)[0])
    forward = nnx.jit(lambda m, t: m(t, return_aux=True))
    logits, aux = forward(model, tokens)
    logits_s, aux_s = forward(scanned, tokens)
    assert_close(logits_s, logits, 1e-5, what="scanned logits")
    for a, b in zip(jax.tree.leaves(aux_s), jax.tree.leaves(aux)):
        assert_close(a, b, 1e-5, what="scanned MoEAux")


def test_greedy_generation_through_the_cache_matches_transformers(checkpoint):
    """Decode mode routes each new token through the same block: transformers' greedy ``generate`` tokens."""
    from sftjax.infer.generate import generate_ids

    hf_model, directory = checkpoint
    model, _ = load_model(directory)
    prompt = [5, 17, 33, 9, 60, 42]
    ours = generate_ids(model, prompt, max_new_tokens=16)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()
