"""Shared pieces of the family files: reading config.json through transformers' own config classes (so missing
keys get the same defaults as transformers), writing it back, and the HF weight-name table.

A ``TensorSpec`` says where one HF tensor goes: into one parameter, or (fused checkpoints such as Phi-3's
``qkv_proj``) into several parameters, each taking a row range of the HF tensor. HF linear weights are
[out, in]; our kernels are [in, out], so ``transpose`` is set for them.
"""

from __future__ import annotations

import dataclasses
import json
import math

from sftjax.errors import CheckpointError
from sftjax.models.config import ModelConfig

HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu",
}
OUR_ACTIVATION_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    targets: tuple[tuple[str, int | None, int | None], ...]  # (param path, first row, end row) of the HF tensor
    transpose: bool
    expert: int | None = None  # a per-expert tensor fills this slot of a stacked [expert, ...] parameter


def hf_config_object(hf: dict, model_type: str, source: str):
    """transformers' config object for ``hf`` (applies the class defaults and rope standardization)."""
    from transformers import CONFIG_MAPPING
    import transformers.utils.logging as hf_logging

    kwargs = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version", "architectures")}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return CONFIG_MAPPING[model_type](**kwargs)
    except Exception as error:  # transformers validates values (e.g. bad rope parameters)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{source}: invalid {model_type} config: {message}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _token_id(value):
    if isinstance(value, list):
        return tuple(value) if len(value) != 1 else value[0]
    return value


def base_config(hf: dict, cfg, *, architecture: str, family: str, source: str, rope: dict | None = None,
                **overrides) -> ModelConfig:
    """ModelConfig fields every family shares, read from the transformers config object ``cfg``; ``rope`` replaces
    ``cfg.rope_parameters`` (a family with one RoPE per layer type passes its full-attention layers' one)."""
    rope = dict(cfg.rope_parameters or {}) if rope is None else dict(rope)
    if rope and all(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError(f"{source}: per-layer-type rope_parameters are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "su":
        rope_type = "longrope"
    if rope_type not in ("default", "linear", "dynamic", "llama3", "longrope", "yarn"):
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported "
                              "(supported: default, linear, dynamic, llama3, longrope, yarn)")
    activation_name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if activation_name not in HF_ACTIVATIONS:
        raise CheckpointError(f"{source}: activation {activation_name!r} is not supported "
                              f"(supported: {', '.join(sorted(HF_ACTIVATIONS))})")
    num_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    original = rope.get("original_max_position_embeddings")
    if rope_type == "longrope" and getattr(cfg, "original_max_position_embeddings", None):
        original = cfg.original_max_position_embeddings
    factor, yarn_fields = rope.get("factor"), {}
    if rope_type == "yarn":
        factor, yarn_fields = _yarn_fields(rope, cfg)
    fields = dict(
        architecture=architecture,
        family=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
        rope_type=rope_type,
        rope_factor=float(factor or 1.0),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=original,
        rope_short_factor=tuple(rope["short_factor"]) if rope.get("short_factor") else None,
        rope_long_factor=tuple(rope["long_factor"]) if rope.get("long_factor") else None,
        rope_attention_factor=rope.get("attention_factor"),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)
                                             ) or 1.0),
        activation=HF_ACTIVATIONS[activation_name],
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        bos_token_id=_token_id(getattr(cfg, "bos_token_id", None)),
        eos_token_id=_token_id(getattr(cfg, "eos_token_id", None)),
        pad_token_id=_token_id(getattr(cfg, "pad_token_id", None)),
    )
    fields.update(yarn_fields)
    fields.update(overrides)
    extra_keys = sorted(set(hf) - HANDLED_KEYS)
    fields["hf_extra"] = tuple((k, json.dumps(hf[k])) for k in extra_keys if _is_json(hf[k]))
    try:
        return ModelConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


# config.json keys that base_config or a family reads; anything else is carried in hf_extra for the round trip.
HANDLED_KEYS = {
    "architectures", "model_type", "transformers_version", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "hidden_act",
    "hidden_activation", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
    "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "attn_logit_softcapping",
    "final_logit_softcapping", "query_pre_attn_scalar", "original_max_position_embeddings", "torch_dtype", "dtype",
    "use_cache", "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "mlp_only_layers", "decoder_sparse_step", "router_aux_loss_coef", "router_jitter_noise",
}


def _yarn_fields(rope: dict, cfg) -> tuple[float, dict]:
    """(factor, the yarn-only ModelConfig fields) of a yarn ``rope_parameters``, resolved like transformers
    (a missing factor is max / original positions; mscale / mscale_all_dim fold into the attention factor)."""
    original = rope.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = rope.get("factor") or cfg.max_position_embeddings / original
    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:
        def get_mscale(scale, m):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return float(factor), dict(rope_attention_factor=attention_factor,
                               rope_beta_fast=float(rope.get("beta_fast") or 32.0),
                               rope_beta_slow=float(rope.get("beta_slow") or 1.0),
                               rope_truncate=bool(rope.get("truncate", True)))


def rope_parameters_to_hf(config: ModelConfig) -> dict:
    rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = config.partial_rotary_factor
    if config.rope_type in ("linear", "dynamic", "llama3", "yarn"):
        rope["factor"] = config.rope_factor
    if config.rope_type == "yarn":
        rope.update(beta_fast=config.rope_beta_fast, beta_slow=config.rope_beta_slow, truncate=config.rope_truncate,
                    original_max_position_embeddings=(config.rope_original_max_position_embeddings
                                                      or config.max_position_embeddings))
        if config.rope_attention_factor is not None:
            rope["attention_factor"] = config.rope_attention_factor
    if config.rope_type == "llama3":
        rope["low_freq_factor"] = config.rope_low_freq_factor
        rope["high_freq_factor"] = config.rope_high_freq_factor
        rope["original_max_position_embeddings"] = (config.rope_original_max_position_embeddings
                                                    or config.max_position_embeddings)
    if config.rope_type == "longrope":
        rope["short_factor"] = list(config.rope_short_factor)
        rope["long_factor"] = list(config.rope_long_factor)
        if config.rope_attention_factor is not None:
            rope["attention_factor"] = config.rope_attention_factor
        if config.rope_original_max_position_embeddings:
            rope["original_max_position_embeddings"] = config.rope_original_max_position_embeddings
    return rope


def base_config_to_hf(config: ModelConfig, model_type: str) -> dict:
    """The keys every family writes; families add their own."""
    hf = {key: json.loads(value) for key, value in config.hf_extra}
    hf.update(
        architectures=[config.architecture],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope_parameters_to_hf(config),
        hidden_act=OUR_ACTIVATION_TO_HF[config.activation],
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        pad_token_id=config.pad_token_id,
        dtype=config.param_dtype,
    )
    return hf


def layer_types_to_hf(config: ModelConfig) -> list[str] | None:
    if config.sliding_window is None:
        return None
    if config.layer_types is None:
        return ["sliding_attention"] * config.num_layers
    return list(config.layer_types)


def llama_like_specs(config: ModelConfig, *, sandwich_norm_names: bool = False, moe_specs=None) -> list[TensorSpec]:
    """The weight table of Llama-style checkpoints (``model.layers.N.self_attn.q_proj.weight`` ...); the MoE layers'
    feed-forward tensors come from ``moe_specs(layer_index)`` (see ``families/moe_common.py``)."""
    specs = [TensorSpec("model.embed_tokens.weight", (("embed_tokens.embedding", None, None),), False),
             TensorSpec("model.norm.weight", (("norm.weight", None, None),), False)]
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (("lm_head.kernel", None, None),), True))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append(TensorSpec(f"{hf}.self_attn.{proj}.weight", ((f"{ours}.attn.{proj}.kernel", None, None),),
                                    True))
            has_bias = config.attention_out_bias if proj == "o_proj" else config.attention_bias
            if has_bias:
                specs.append(TensorSpec(f"{hf}.self_attn.{proj}.bias", ((f"{ours}.attn.{proj}.bias", None, None),),
                                        False))
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                specs.append(TensorSpec(f"{hf}.self_attn.{norm}.weight", ((f"{ours}.attn.{norm}.weight", None, None),),
                                        False))
        if config.is_moe_layer(i):
            if moe_specs is None:
                raise CheckpointError(f"model config: {config.architecture} has no MoE weight layout")
            specs += moe_specs(i)
        for proj in ("gate_proj", "up_proj", "down_proj") if not config.is_moe_layer(i) else ():
            specs.append(TensorSpec(f"{hf}.mlp.{proj}.weight", ((f"{ours}.mlp.{proj}.kernel", None, None),), True))
            if config.mlp_bias:
                specs.append(TensorSpec(f"{hf}.mlp.{proj}.bias", ((f"{ours}.mlp.{proj}.bias", None, None),), False))
        norms = {"input_layernorm": "attn_norm"}
        if sandwich_norm_names:
            norms.update(post_attention_layernorm="attn_out_norm", pre_feedforward_layernorm="mlp_norm",
                         post_feedforward_layernorm="mlp_out_norm")
        else:
            norms.update(post_attention_layernorm="mlp_norm")
        for hf_norm, our_norm in norms.items():
            specs.append(TensorSpec(f"{hf}.{hf_norm}.weight", ((f"{ours}.{our_norm}.weight", None, None),), False))
    return specs


# Multimodal checkpoints (Gemma 3/4 ...ForConditionalGeneration) hold their text decoder under one of these prefixes
# (the older layout first, then transformers 5's); every other tensor belongs to a vision or audio tower.
_TEXT_DECODER_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                          ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def text_decoder_config(hf: dict, architecture: str) -> dict:
    """The text decoder's config.json dict of a multimodal config (its ``text_config``); ``hf`` itself otherwise."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        return hf
    text = dict(text, architectures=[architecture])
    if "tie_word_embeddings" in hf:
        text.setdefault("tie_word_embeddings", hf["tie_word_embeddings"])
    return text


def text_decoder_tensor_name(hf: dict, name: str) -> str | None:
    """The text decoder's tensor name (``model.*``, ``lm_head.*``) of a multimodal checkpoint's tensor, None for a
    tensor of another tower; names of a text-only checkpoint pass unchanged."""
    if not isinstance(hf.get("text_config"), dict):
        return name
    for prefix, replacement in _TEXT_DECODER_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return None
