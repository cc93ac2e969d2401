"""gpt-oss against transformers (PyTorch CPU float32, eager attention, output_router_logits=True) on tiny random
checkpoints: logits, the load-balancing loss, the training loss with it and every gradient (attention sinks and
the expert biases included), the save round trip, and a checkpoint whose experts are stored in MXFP4."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy  # noqa: E402
from sftjax.errors import CheckpointError  # noqa: E402
from sftjax.models.loading import load_model, save_model  # noqa: E402
from tests.models.hf_reference import flat, gradients_in_our_layout, masked_cross_entropy  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

VOCAB, LENGTH = 96, 20
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
              num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05,
              sliding_window=6, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
              rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
              swiglu_limit=7.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(**CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # every weight off its default (sinks and biases too); sharp routers
        for name, parameter in model.named_parameters():
            if name.endswith("sinks"):
                parameter.copy_(torch.randn_like(parameter))
            elif name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            else:
                scale = 0.5 if "router" in name else (0.3 if "experts" in name else 0.1)
                parameter.copy_(scale * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    hf_model = _hf_model()
    directory = tmp_path_factory.mktemp("gpt_oss")
    hf_model.save_pretrained(directory)
    model, config = load_model(directory, dtype=jnp.float32)
    return hf_model, model, config


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, size=(2, LENGTH)).astype(np.int32)
    targets = rng.integers(0, VOCAB, size=(2, LENGTH)).astype(np.int32)
    mask = (rng.random((2, LENGTH)) < 0.6).astype(np.int32)
    return tokens, targets, mask


@nnx.jit
def _forward(model, tokens):
    return model(tokens, return_aux=True)


def test_config_translation(gpt_oss):
    _, _, config = gpt_oss
    assert config.attention_sinks and config.attention_bias and config.attention_out_bias
    assert config.layer_types == ("sliding_attention", "full_attention") and config.sliding_window == 6
    assert (config.rope_type, config.rope_factor, config.rope_truncate) == ("yarn", 4.0, False)
    moe = config.moe
    assert (moe.router_order, moe.router_bias, moe.expert_bias, moe.activation) == (
        "topk_softmax", True, True, "clamped_swiglu")
    assert config.moe_layers == (0, 1)


def test_logits_and_aux_loss_match_transformers(gpt_oss):
    hf_model, model, _ = gpt_oss
    tokens, _, _ = _batch()
    with torch.no_grad():
        out = hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=False)
    logits, aux = _forward(model, jnp.asarray(tokens))
    assert_close(logits, out.logits, 1e-5, what="logits")
    lb_sum, count = aux.load_balancing()
    assert_close(lb_sum / count, out.aux_loss, 1e-5, what="load-balancing loss")


def _objective(model, tokens, targets, mask, coef):
    hidden, aux = model.hidden_states(tokens, return_aux=True)
    result = fused_linear_cross_entropy(hidden, model.head_weight(), targets, mask)
    lb_sum, count = aux.load_balancing()
    return result.loss_sum / result.token_count + coef * lb_sum / count


def test_loss_and_every_gradient_match_transformers(gpt_oss, tmp_path):
    hf_model, model, config = gpt_oss
    tokens, targets, mask = _batch(seed=1)
    coef = config.moe.router_aux_loss_coef
    loss, grads = nnx.jit(nnx.value_and_grad(_objective), static_argnums=(4,))(
        model, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(mask), coef)
    hf_model.zero_grad()
    out = hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=False)
    ref_loss = masked_cross_entropy(out.logits, targets, mask) + hf_model.router_aux_loss_coef * out.aux_loss
    ref_loss.backward()
    assert_close(loss, ref_loss, 1e-5, what="loss with the aux loss")
    ref = gradients_in_our_layout(hf_model, _hf_model, tmp_path / "grads")
    ours = flat(grads)
    assert set(ours) == set(ref)
    assert {"layers.0.attn.sinks", "layers.1.mlp.experts.gate_proj.bias", "layers.0.mlp.router.bias"} <= set(ours)
    for path, want in ref.items():
        assert_close(ours[path], want, 5e-5, what=f"d loss / d {path}")


def test_save_round_trip_into_transformers(gpt_oss, tmp_path):
    hf_model, model, config = gpt_oss
    save_model(model, config, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is type(hf_model)
    want_state = hf_model.state_dict()
    for name, value in back.state_dict().items():  # every weight (the interleaved gate/up included) bit for bit
        np.testing.assert_array_equal(value.numpy(), want_state[name].numpy(), err_msg=name)
    assert back.config.rope_parameters == hf_model.config.rope_parameters
    assert back.config.layer_types == hf_model.config.layer_types


def _mxfp4_checkpoint(directory, hf_model):
    """hf_model's files with the experts replaced by random MXFP4 blocks/scales, as the Hub stores gpt-oss."""
    from safetensors.numpy import load_file, save_file

    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf_model.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    rng = np.random.default_rng(0)
    reference = {}
    for layer in range(CONFIG["num_hidden_layers"]):
        for proj, out_dim, in_dim in (("gate_up_proj", 2 * 32, 32), ("down_proj", 32, 32)):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            del tensors[name]
            blocks = rng.integers(0, 256, size=(4, out_dim, in_dim // 32, 16), dtype=np.uint8)
            scales = rng.integers(120, 126, size=(4, out_dim, in_dim // 32), dtype=np.uint8)
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            reference[name] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                         dtype=torch.float32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                         "model.layers.*.mlp.router"]}
    (directory / "config.json").write_text(json.dumps(config))
    return reference


def test_mxfp4_checkpoint_loads_dequantized_and_exports_unquantized(gpt_oss, tmp_path):
    hf_model, _, _ = gpt_oss
    reference = _mxfp4_checkpoint(tmp_path / "mxfp4", hf_model)
    model, config = load_model(tmp_path / "mxfp4", dtype=jnp.float32)
    assert "quantization_config" not in dict(config.hf_extra)
    dequantized = _hf_model()  # the same model with transformers' own dequantization of those experts
    with torch.no_grad():
        dequantized.load_state_dict(hf_model.state_dict())
        for name, value in reference.items():
            dequantized.get_parameter(name).copy_(value)
    tokens, _, _ = _batch(seed=4)
    with torch.no_grad():
        want = dequantized(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits
    logits, _ = _forward(model, jnp.asarray(tokens))
    assert_close(logits, want, 1e-5, what="logits of the MXFP4 checkpoint")
    save_model(model, config, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in written


def test_bad_gpt_oss_checkpoints_are_one_line_errors(gpt_oss, tmp_path):
    hf_model, _, _ = gpt_oss
    hf_model.save_pretrained(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method='bitsandbytes' is not supported for gpt-oss"):
        load_model(tmp_path / "bad")
