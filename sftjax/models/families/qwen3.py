"""Qwen3: RMSNorm over head_dim on q and k before RoPE, explicit head_dim, optional attention bias."""

from __future__ import annotations

from sftjax.models.config import ModelConfig
from sftjax.models.families.common import base_config, base_config_to_hf, hf_config_object, llama_like_specs
from sftjax.models.families.qwen2 import sliding_fields, sliding_to_hf

MODEL_TYPE = "qwen3"
ARCHITECTURES = ("Qwen3ForCausalLM",)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    bias = bool(getattr(cfg, "attention_bias", False))
    return base_config(hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source, qk_norm=True,
                       attention_bias=bias, attention_out_bias=bias, **sliding_fields(cfg))


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf.update(attention_bias=config.attention_bias, **sliding_to_hf(config))
    return hf


def weight_specs(config: ModelConfig):
    return llama_like_specs(config)
