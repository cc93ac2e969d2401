"""Mixtral and Qwen3-MoE against transformers (PyTorch CPU float32, use_cache=False, output_router_logits=True), on
tiny random checkpoints loaded from safetensors: logits, the load-balancing loss, the training loss with the aux loss
(router_aux_loss_coef) and every gradient; the save round trip; scanned layers equal unscanned."""

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
from sftjax.models.loading import load_model, save_model  # noqa: E402
from sftjax.models.scan import stack_layers  # noqa: E402
from tests.models.hf_reference import flat, gradients_in_our_layout, masked_cross_entropy  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

VOCAB, LENGTH = 96, 16
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, rms_norm_eps=1e-5, num_experts_per_tok=2, output_router_logits=True,
              router_aux_loss_coef=0.05, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    # a sliding window shorter than the sequence on every layer
    "mixtral": ("MixtralConfig", dict(COMMON, intermediate_size=24, num_hidden_layers=2, num_local_experts=4,
                                      sliding_window=6)),
    # renormalized top-k; layer 1 keeps the dense MLP
    "qwen3_moe_norm_mlp_only": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=40, moe_intermediate_size=16,
                                                       num_hidden_layers=3, num_experts=4, norm_topk_prob=True,
                                                       mlp_only_layers=[1])),
    # raw top-k probabilities; every second layer sparse (layers 1 and 3)
    "qwen3_moe_sparse_step": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=40, moe_intermediate_size=16,
                                                     num_hidden_layers=4, num_experts=6, norm_topk_prob=False,
                                                     decoder_sparse_step=2)),
}
MOE_LAYERS = {"mixtral": (0, 1), "qwen3_moe_norm_mlp_only": (0, 2), "qwen3_moe_sparse_step": (1, 3)}


def _hf_model(case: str):
    config_class, kwargs = CASES[case]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # every weight off its default; routers sharp enough that routing is not a near-tie
        for name, parameter in model.named_parameters():
            scale = 0.5 if name.endswith("mlp.gate.weight") else 0.05
            parameter.add_(scale * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def moe_case(request, tmp_path_factory):
    case = request.param
    hf_model = _hf_model(case)
    directory = tmp_path_factory.mktemp(case)
    hf_model.save_pretrained(directory)
    model, config = load_model(directory, dtype=jnp.float32)
    return case, hf_model, model, config, directory


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, size=(2, LENGTH)).astype(np.int32)
    targets = rng.integers(0, VOCAB, size=(2, LENGTH)).astype(np.int32)
    mask = (rng.random((2, LENGTH)) < 0.6).astype(np.int32)
    return tokens, targets, mask


@nnx.jit
def _forward(model, tokens):
    return model(tokens, return_aux=True)


def _objective(model, tokens, targets, mask, coef):
    """Our training objective of one micro-batch (what sftjax.train.step differentiates, normalized)."""
    hidden, aux = model.hidden_states(tokens, return_aux=True)
    result = fused_linear_cross_entropy(hidden, model.head_weight(), targets, mask)
    lb_sum, count = aux.load_balancing()
    return result.loss_sum / result.token_count + coef * lb_sum / count, (result.loss_sum / result.token_count,
                                                                          lb_sum / count)


def test_config_and_layers(moe_case):
    case, hf_model, model, config, _ = moe_case
    assert config.moe_layers == MOE_LAYERS[case]
    assert config.moe.num_experts == hf_model.config.num_experts
    assert config.moe.norm_topk_prob == (case != "qwen3_moe_sparse_step")
    assert config.moe.router_aux_loss_coef == 0.05


def test_logits_and_aux_loss_match_transformers(moe_case):
    _, hf_model, model, _, _ = moe_case
    tokens, _, _ = _batch()
    with torch.no_grad():
        out = hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=False)
    logits, aux = _forward(model, jnp.asarray(tokens))
    assert_close(logits, out.logits, 1e-5, what="logits")
    lb_sum, count = aux.load_balancing()
    assert float(count) == tokens.size
    assert_close(lb_sum / count, out.aux_loss, 1e-5, what="load-balancing loss")
    assert float(aux.layers) == len(out.router_logits)


def test_loss_with_aux_and_every_gradient_match_transformers(moe_case, tmp_path):
    case, hf_model, model, config, _ = moe_case
    tokens, targets, mask = _batch(seed=1)
    coef = config.moe.router_aux_loss_coef
    grad_fn = nnx.jit(nnx.value_and_grad(_objective, has_aux=True), static_argnums=(4,))
    (loss, (ce, lb)), grads = grad_fn(model, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(mask), coef)

    hf_model.zero_grad()
    out = hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=False)
    ref_ce = masked_cross_entropy(out.logits, targets, mask)
    ref_loss = ref_ce + hf_model.router_aux_loss_coef * out.aux_loss  # as the model's own loss adds it
    ref_loss.backward()
    assert_close(ce, ref_ce, 1e-5, what="cross-entropy")
    assert_close(lb, out.aux_loss, 1e-5, what="aux loss")
    assert_close(loss, ref_loss, 1e-5, what="loss with the aux loss")
    ref = gradients_in_our_layout(hf_model, lambda: _hf_model(case), tmp_path / "grads")
    ours = flat(grads)
    assert set(ours) == set(ref)
    assert any("experts.down_proj.kernel" in path for path in ours) and any("router.kernel" in path for path in ours)
    for path, want in ref.items():
        assert_close(ours[path], want, 5e-5, what=f"d loss / d {path}")


def test_save_round_trip_into_transformers(moe_case, tmp_path):
    _, hf_model, model, config, _ = moe_case
    save_model(model, config, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is type(hf_model)
    want_state = hf_model.state_dict()
    for name, value in back.state_dict().items():  # every weight comes back bit for bit
        np.testing.assert_array_equal(value.numpy(), want_state[name].numpy(), err_msg=name)
    tokens, _, _ = _batch(seed=2)
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits
        got = back(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits
    assert_close(got, want, 1e-6, what="logits of the exported model")
    for key in ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits"):
        assert getattr(back.config, key) == getattr(hf_model.config, key), key


def test_scanned_layers_equal_unscanned(moe_case):
    """Mixed dense/MoE stacks scan as runs or periods of equal layers; logits and the summed aux are the same."""
    _, _, model, config, directory = moe_case
    tokens, _, _ = _batch(seed=3)
    logits, aux = _forward(model, jnp.asarray(tokens))
    scanned, _ = load_model(directory, dtype=jnp.float32)
    stack_layers(scanned)
    logits_s, aux_s = _forward(scanned, jnp.asarray(tokens))
    assert_close(logits_s, logits, 1e-5, what="scanned logits")
    for a, b in zip(jax.tree.leaves(aux_s), jax.tree.leaves(aux)):
        assert_close(a, b, 1e-5, what="scanned MoEAux")


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5 is larger than model.moe.num_experts=4"),
    (dict(router_jitter_noise=0.1), "router_jitter_noise=0.1 is not supported"),
    (dict(hidden_act="tanh"), "hidden_act='tanh' is not supported for MoE experts"),
])
def test_unsupported_moe_options_in_config_json_are_one_line_errors(tmp_path, changes, message):
    import json

    from sftjax.errors import SftjaxError

    config = dict(CASES["mixtral"][1], architectures=["MixtralForCausalLM"], model_type="mixtral", **changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(SftjaxError, match=message) as error:
        load_model(tmp_path)
    assert "\n" not in str(error.value)


def test_moe_switches_on_a_dense_model_are_refused():
    from sftjax.errors import ConfigError
    from sftjax.models.config import ModelConfig
    from sftjax.models.decoder import with_moe_overrides

    with pytest.raises(ConfigError, match="model.moe=.* is set but LlamaForCausalLM has no MoE layers"):
        with_moe_overrides(ModelConfig(), {"router_z_loss_coef": 0.1})
