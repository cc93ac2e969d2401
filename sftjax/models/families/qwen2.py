"""Qwen2 / Qwen2.5: Llama blocks with q/k/v biases; optional sliding window on layers >= max_window_layers."""

from __future__ import annotations

from sftjax.models.config import ModelConfig
from sftjax.models.families.common import (
    base_config,
    base_config_to_hf,
    hf_config_object,
    layer_types_to_hf,
    llama_like_specs,
)

MODEL_TYPE = "qwen2"
ARCHITECTURES = ("Qwen2ForCausalLM",)


def sliding_fields(cfg) -> dict:
    """transformers sets sliding_window to None unless use_sliding_window, and derives layer_types."""
    window = cfg.sliding_window
    layer_types = tuple(cfg.layer_types) if window is not None and cfg.layer_types else None
    if window is not None and layer_types is not None and "sliding_attention" not in layer_types:
        window, layer_types = None, None
    return dict(sliding_window=window, layer_types=layer_types)


def sliding_to_hf(config: ModelConfig) -> dict:
    layer_types = layer_types_to_hf(config)
    if layer_types is None:
        return dict(use_sliding_window=False, sliding_window=None)
    return dict(use_sliding_window=True, sliding_window=config.sliding_window, layer_types=layer_types,
                max_window_layers=config.num_layers)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    return base_config(hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source,
                       attention_bias=True, attention_out_bias=False, **sliding_fields(cfg))


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf.update(sliding_to_hf(config))
    return hf


def weight_specs(config: ModelConfig):
    return llama_like_specs(config)
