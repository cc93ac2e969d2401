"""config.json -> ModelConfig -> config.json for every family, both rope styles, and unsupported configs."""

from __future__ import annotations

import pytest

from tests.conftest import require  # noqa: E402

transformers = require("transformers")

from sftjax.errors import CheckpointError  # noqa: E402
from sftjax.models.config import ModelConfig  # noqa: E402
from sftjax.models.registry import config_from_hf, family_for_hf, supported_architectures  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def test_supported_architectures():
    assert set(supported_architectures()) == {
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
        "Gemma2ForCausalLM", "Phi3ForCausalLM"}


def test_both_rope_styles_give_the_same_config():
    legacy = dict(SMALL, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    modern = dict(SMALL, architectures=["LlamaForCausalLM"], model_type="llama",
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
    a, b = config_from_hf(legacy), config_from_hf(modern)
    assert a.replace(hf_extra=()) == b.replace(hf_extra=())
    assert (a.rope_type, a.rope_theta, a.rope_factor, a.rope_original_max_position_embeddings) == (
        "llama3", 500000.0, 8.0, 8192)


def test_family_switches_from_transformers_defaults():
    qwen2 = config_from_hf(dict(SMALL, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                sliding_window=16, max_window_layers=2))
    assert qwen2.attention_bias and not qwen2.attention_out_bias
    assert [qwen2.sliding_window_for_layer(i) for i in range(4)] == [None, None, 16, 16]
    qwen2_off = config_from_hf(dict(SMALL, architectures=["Qwen2ForCausalLM"], sliding_window=16))
    assert qwen2_off.sliding_window is None  # use_sliding_window defaults to False in transformers
    gemma2 = config_from_hf(dict(SMALL, architectures=["Gemma2ForCausalLM"], head_dim=8))
    assert gemma2.sandwich_norms and gemma2.norm_plus_one and gemma2.tie_word_embeddings
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.query_pre_attn_scalar) == (50.0, 30.0, 256)
    assert [gemma2.sliding_window_for_layer(i) for i in range(4)] == [4096, None, 4096, None]
    assert gemma2.embedding_scale == pytest.approx(32 ** 0.5) and gemma2.activation == "gelu_tanh"
    qwen3 = config_from_hf(dict(SMALL, architectures=["Qwen3ForCausalLM"], head_dim=24))
    assert qwen3.qk_norm and qwen3.head_dim == 24
    mistral = config_from_hf(dict(SMALL, architectures=["MistralForCausalLM"], sliding_window=64))
    assert all(mistral.sliding_window_for_layer(i) == 64 for i in range(4))
    phi3 = config_from_hf(dict(SMALL, architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.5))
    assert phi3.rotary_dim == 4


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                          "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
                                          "Phi3ForCausalLM"])
def test_to_hf_dict_round_trips_through_transformers_config(architecture):
    hf = dict(SMALL, architectures=[architecture], initializer_range=0.01, head_dim=8)
    config = config_from_hf(hf)
    written = config.to_hf_dict()
    assert written["architectures"] == [architecture] and written["initializer_range"] == 0.01
    hf_config = transformers.AutoConfig.for_model(**written)
    assert config_from_hf(hf_config.to_dict()).replace(hf_extra=()) == config.replace(hf_extra=())


def test_yarn_rope_round_trips_through_transformers_config():
    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096}
    config = config_from_hf(dict(SMALL, architectures=["LlamaForCausalLM"], max_position_embeddings=131072,
                                 rope_parameters=rope))
    assert (config.rope_type, config.rope_factor, config.rope_truncate) == ("yarn", 32.0, False)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    assert config_from_hf(hf_config.to_dict()).replace(hf_extra=()) == config.replace(hf_extra=())


def test_unsupported_inputs_are_one_line_errors():
    with pytest.raises(CheckpointError, match="unsupported architecture MambaForCausalLM; supported: Llama"):
        family_for_hf({"architectures": ["MambaForCausalLM"]}, source="x/config.json")
    with pytest.raises(CheckpointError, match="rope_type 'proportional' is not supported"):
        config_from_hf(dict(SMALL, architectures=["LlamaForCausalLM"],
                            rope_parameters={"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0}))
    assert family_for_hf({"model_type": "qwen3"}).MODEL_TYPE == "qwen3"


def test_model_config_validates_switches():
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="tanh")
    with pytest.raises(ValueError, match="divide"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="sometimes")


def test_to_hf_dict_refuses_switches_the_architecture_cannot_express():
    config = config_from_hf(dict(SMALL, architectures=["LlamaForCausalLM"]))
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM checkpoints cannot express sliding_window=8"):
        config.replace(sliding_window=8).to_hf_dict()
    with pytest.raises(CheckpointError, match=r"qk_norm=True"):
        config.replace(qk_norm=True).to_hf_dict()
    assert config.replace(remat="full", dtype="bfloat16").to_hf_dict()["num_hidden_layers"] == 4
    default = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)  # a randomly initialised model's config exports as Llama
    assert default.to_hf_dict()["architectures"] == ["LlamaForCausalLM"]
