"""Mistral: Llama blocks with a sliding attention window on every layer."""

from __future__ import annotations

from sftjax.models.config import ModelConfig
from sftjax.models.families.common import base_config, base_config_to_hf, hf_config_object, llama_like_specs

MODEL_TYPE = "mistral"
ARCHITECTURES = ("MistralForCausalLM",)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    return base_config(hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source,
                       sliding_window=cfg.sliding_window, layer_types=None)


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf.update(sliding_window=config.sliding_window)
    return hf


def weight_specs(config: ModelConfig):
    return llama_like_specs(config)
