"""Gemma 3 (text): Gemma 2's blocks (sandwich norms, (1 + w) RMSNorm, scaled embeddings, query_pre_attn_scalar)
plus q/k RMSNorm, a local/global layer pattern (``layer_types``, or the older ``sliding_window_pattern``: every
n-th layer full) and two RoPEs: sliding layers rotate with the default RoPE at ``rope_local_base_freq``, full layers
with ``rope_theta`` and the rope scaling. No soft-capping unless the config sets it.

A ``Gemma3ForConditionalGeneration`` checkpoint (4B and larger, with a vision tower) is read as its text decoder:
the ``text_config`` and the ``language_model`` tensors, the vision tower and projector skipped; it is saved back as
the ``Gemma3ForCausalLM`` it then is.
"""

from __future__ import annotations

from sftjax.errors import CheckpointError
from sftjax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from sftjax.models.families.common import (
    base_config,
    base_config_to_hf,
    hf_config_object,
    text_decoder_config,
    text_decoder_tensor_name,
    llama_like_specs,
    rope_parameters_to_hf,
)

MODEL_TYPE = "gemma3_text"
ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")  # the second read as its text decoder
# config.json keys read here (beyond common.HANDLED_KEYS): not carried as extras
FAMILY_KEYS = ("rope_local_base_freq", "sliding_window_pattern", "use_bidirectional_attention")


def sliding_rope_theta(cfg, source: str) -> float:
    """The base of the sliding layers' RoPE, which must be the default (unscaled) one."""
    sliding = dict((cfg.rope_parameters or {}).get(SLIDING_ATTENTION) or {})
    rope_type = sliding.get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope_parameters.sliding_attention.rope_type {rope_type!r} is not supported "
                              "(sliding layers take the default RoPE)")
    return float(sliding["rope_theta"])


def full_rope(cfg) -> dict:
    return dict((cfg.rope_parameters or {}).get(FULL_ATTENTION) or {"rope_type": "default"})


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    hf = text_decoder_config(hf, ARCHITECTURES[0])
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    if cfg.use_bidirectional_attention:
        raise CheckpointError(f"{source}: use_bidirectional_attention=true is not supported (causal LM only)")
    bias = bool(getattr(cfg, "attention_bias", False))
    extras = {k: v for k, v in hf.items() if k not in FAMILY_KEYS}
    return base_config(
        extras, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source, rope=full_rope(cfg),
        norm_plus_one=True, embedding_scale=cfg.hidden_size ** 0.5, sandwich_norms=True, qk_norm=True,
        attention_bias=bias, attention_out_bias=bias, sliding_window=cfg.sliding_window,
        layer_types=tuple(cfg.layer_types) if cfg.sliding_window is not None else None,
        sliding_rope_theta=sliding_rope_theta(cfg, source) if cfg.sliding_window is not None else None,
        attn_logit_softcap=cfg.attn_logit_softcapping, final_logit_softcap=cfg.final_logit_softcapping,
        query_pre_attn_scalar=float(cfg.query_pre_attn_scalar))


def per_layer_type_rope_to_hf(config: ModelConfig) -> dict:
    return {FULL_ATTENTION: rope_parameters_to_hf(config),
            SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": config.sliding_rope_theta or config.rope_theta}}


def layer_types_list(config: ModelConfig) -> list[str]:
    return [config.layer_type(i) for i in range(config.num_layers)]


checkpoint_tensor_name = text_decoder_tensor_name  # a multimodal checkpoint's text decoder tensors, else None


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf["hidden_activation"] = hf.pop("hidden_act")
    scalar = config.query_pre_attn_scalar or config.head_dim
    hf.update(attention_bias=config.attention_bias, sliding_window=config.sliding_window,
              layer_types=layer_types_list(config), rope_parameters=per_layer_type_rope_to_hf(config),
              attn_logit_softcapping=config.attn_logit_softcap, final_logit_softcapping=config.final_logit_softcap,
              query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar)
    return hf


def weight_specs(config: ModelConfig):
    return llama_like_specs(config, sandwich_norm_names=True)
