"""Llama 2/3/3.1/3.2 and Llama-architecture models (SmolLM2, TinyLlama): the baseline family."""

from __future__ import annotations

from sftjax.models.config import ModelConfig
from sftjax.models.families.common import base_config, base_config_to_hf, hf_config_object, llama_like_specs

MODEL_TYPE = "llama"
ARCHITECTURES = ("LlamaForCausalLM",)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    bias = bool(getattr(cfg, "attention_bias", False))
    return base_config(hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source,
                       attention_bias=bias, attention_out_bias=bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)))


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    return hf


def weight_specs(config: ModelConfig):
    return llama_like_specs(config)
