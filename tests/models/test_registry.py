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
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "Gemma4ForCausalLM",
        "Gemma4ForConditionalGeneration", "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM",
        "GptOssForCausalLM"}


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
                                          "Gemma3ForCausalLM", "Gemma4ForCausalLM", "Phi3ForCausalLM"])
def test_to_hf_dict_round_trips_through_transformers_config(architecture):
    hf = dict(SMALL, architectures=[architecture], initializer_range=0.01, head_dim=8)
    if architecture == "Gemma4ForCausalLM":
        hf.update(hidden_size_per_layer_input=0, global_head_dim=16, num_global_key_value_heads=1,
                  attention_k_eq_v=True)
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
    with pytest.raises(ValueError, match="^global_head_dim sets full and sliding layers apart, so it needs"):
        ModelConfig(global_head_dim=256)


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


def test_gemma3_switches_from_transformers_defaults():
    """Gemma 3's config.json as the Hub has it: rope_theta/rope_local_base_freq/rope_scaling and
    sliding_window_pattern (every 6th layer full by default), no layer_types."""
    gemma3 = config_from_hf(dict(SMALL, num_hidden_layers=12, architectures=["Gemma3ForCausalLM"], head_dim=8,
                                 model_type="gemma3_text", sliding_window=512, rope_theta=1e6,
                                 rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert [gemma3.layer_type(i) == "full_attention" for i in range(12)] == [(i + 1) % 6 == 0 for i in range(12)]
    assert gemma3.sandwich_norms and gemma3.norm_plus_one and gemma3.qk_norm and gemma3.tie_word_embeddings
    assert (gemma3.attn_logit_softcap, gemma3.final_logit_softcap, gemma3.query_pre_attn_scalar) == (None, None, 256)
    assert (gemma3.rope_type, gemma3.rope_theta, gemma3.rope_factor, gemma3.sliding_rope_theta) == (
        "linear", 1e6, 8.0, 1e4)
    sliding = gemma3.for_layer_type("sliding_attention")
    assert (sliding.rope_type, sliding.rope_theta, sliding.rope_factor) == ("default", 1e4, 1.0)
    assert not {"rope_theta", "rope_local_base_freq", "sliding_window_pattern"} & set(dict(gemma3.hf_extra))
    written = gemma3.to_hf_dict()
    assert written["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert config_from_hf(written) == gemma3


def test_gemma4_switches_from_transformers_defaults():
    gemma4 = config_from_hf(dict(SMALL, num_hidden_layers=6, architectures=["Gemma4ForCausalLM"], head_dim=8,
                                 hidden_size_per_layer_input=0, attention_k_eq_v=True, global_head_dim=16,
                                 num_global_key_value_heads=1))
    assert [gemma4.layer_type(i) for i in range(6)] == ["sliding_attention"] * 5 + ["full_attention"]
    full = gemma4.for_layer_type("full_attention")
    assert (full.head_dim, full.num_kv_heads, full.rope_type, full.rope_theta, full.rotary_dim) == (
        16, 1, "proportional", 1e6, 16)
    sliding = gemma4.for_layer_type("sliding_attention")
    assert (sliding.head_dim, sliding.num_kv_heads, sliding.rope_type, sliding.rope_theta) == (8, 2, "default", 1e4)
    assert gemma4.attention_scale == 1.0 and not gemma4.norm_plus_one and gemma4.v_norm and gemma4.layer_scalar
    assert gemma4.sliding_window == 512 and gemma4.attention_k_eq_v


@pytest.mark.parametrize("changes, message", [
    (dict(num_kv_shared_layers=1), "num_kv_shared_layers=1: no layer before the shared ones is a full_attention"),
    (dict(num_kv_shared_layers=99), "num_kv_shared_layers=99 must leave at least one of the"),
    (dict(use_bidirectional_attention="all"), "use_bidirectional_attention='all'"),
    (dict(enable_moe_block=True, top_k_experts=5), "top_k_experts=5 is larger than num_experts=4"),
    (dict(enable_moe_block=True, num_experts=None), "enable_moe_block=true needs num_experts to be a positive"),
    (dict(enable_moe_block=True, moe_intermediate_size=0), "needs moe_intermediate_size to be a positive integer"),
    (dict(enable_moe_block=True, num_kv_shared_layers=1, layer_types=["full_attention"] * 4,
          use_double_wide_mlp=True), "enable_moe_block=true with use_double_wide_mlp=true and num_kv_shared"),
])
def test_gemma4_options_the_decoder_cannot_run_are_one_line_errors(tmp_path, changes, message):
    """Refused when load_model reads the checkpoint's config.json, before any weight is read."""
    import json

    from sftjax.models.loading import load_model

    hf = dict(SMALL, architectures=["Gemma4ForCausalLM"], head_dim=8, hidden_size_per_layer_input=0,
              num_experts=4, top_k_experts=2, moe_intermediate_size=16)
    hf.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    assert message in str(error.value) and str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_gemma3_bidirectional_and_scaled_sliding_rope_are_one_line_errors():
    base = dict(SMALL, architectures=["Gemma3ForCausalLM"], head_dim=8)
    with pytest.raises(CheckpointError, match=r"^c: use_bidirectional_attention=true is not supported"):
        config_from_hf(dict(base, use_bidirectional_attention=True), source="c")
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}
    with pytest.raises(CheckpointError, match=r"^c: rope_parameters.sliding_attention.rope_type 'linear' is not"):
        config_from_hf(dict(base, rope_parameters=rope), source="c")
