"""Qwen3-MoE: Qwen3 blocks (qk-norm) whose MLP is a softmax-top-k mixture of experts (``norm_topk_prob`` choosing
the renormalization), except the layers of ``mlp_only_layers`` and those ``decoder_sparse_step`` skips."""

from __future__ import annotations

from sftjax.models.config import ModelConfig
from sftjax.models.families.common import base_config, base_config_to_hf, hf_config_object, llama_like_specs
from sftjax.models.families.moe_common import moe_fields, moe_layer_specs, moe_to_hf

MODEL_TYPE = "qwen3_moe"
ARCHITECTURES = ("Qwen3MoeForCausalLM",)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    bias = bool(getattr(cfg, "attention_bias", False))
    window = cfg.sliding_window  # transformers: None unless use_sliding_window; then on every layer
    return base_config(hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source, qk_norm=True,
                       attention_bias=bias, attention_out_bias=bias, sliding_window=window, layer_types=None,
                       **moe_fields(cfg, MODEL_TYPE, source=source))


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    moe = config.moe
    hf.update(attention_bias=config.attention_bias, use_sliding_window=config.sliding_window is not None,
              sliding_window=config.sliding_window, num_experts=moe.num_experts,
              moe_intermediate_size=moe.expert_intermediate_size, norm_topk_prob=moe.norm_topk_prob,
              mlp_only_layers=list(config.mlp_only_layers), decoder_sparse_step=config.decoder_sparse_step,
              **moe_to_hf(config))
    return hf


def weight_specs(config: ModelConfig):
    return llama_like_specs(config, moe_specs=lambda i: moe_layer_specs(config, i, block="mlp", style="qwen_moe"))
