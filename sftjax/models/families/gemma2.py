"""Gemma2: Gemma plus sandwich norms, attention and final logit soft-capping, alternating sliding-window layers
and attention scores scaled by query_pre_attn_scalar ** -0.5."""

from __future__ import annotations

from sftjax.models.config import ModelConfig
from sftjax.models.families.common import (
    base_config,
    base_config_to_hf,
    hf_config_object,
    layer_types_to_hf,
    llama_like_specs,
)

MODEL_TYPE = "gemma2"
ARCHITECTURES = ("Gemma2ForCausalLM",)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    bias = bool(getattr(cfg, "attention_bias", False))
    window = cfg.sliding_window
    return base_config(
        hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source, norm_plus_one=True,
        embedding_scale=cfg.hidden_size ** 0.5, sandwich_norms=True, attention_bias=bias, attention_out_bias=bias,
        sliding_window=window, layer_types=tuple(cfg.layer_types) if window is not None else None,
        attn_logit_softcap=cfg.attn_logit_softcapping, final_logit_softcap=cfg.final_logit_softcapping,
        query_pre_attn_scalar=float(cfg.query_pre_attn_scalar))


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf["hidden_activation"] = hf.pop("hidden_act")
    hf.update(attention_bias=config.attention_bias, sliding_window=config.sliding_window,
              layer_types=layer_types_to_hf(config) or ["full_attention"] * config.num_layers,
              attn_logit_softcapping=config.attn_logit_softcap, final_logit_softcapping=config.final_logit_softcap,
              query_pre_attn_scalar=_int_if_whole(config.query_pre_attn_scalar or config.head_dim))
    return hf


def _int_if_whole(value):
    return int(value) if float(value).is_integer() else value


def weight_specs(config: ModelConfig):
    return llama_like_specs(config, sandwich_norm_names=True)
