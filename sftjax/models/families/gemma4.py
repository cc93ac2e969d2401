"""Gemma 4 (text): sandwich norms with plain-weight RMSNorm (x * w, not Gemma 3's (1 + w)), scaled embeddings,
q/k RMSNorm and weightless value RMSNorm, attention scores unscaled (scale 1), a local/global layer pattern
(``layer_types``; the last layer is always full) with the default RoPE on sliding layers and, on full layers,
their own RoPE (``proportional`` by default: only a share of each head's frequency pairs rotate) and their own head
shape (``global_head_dim``, ``num_global_key_value_heads``, or ``per_layer_config``), keys reused as values on full
layers (``attention_k_eq_v``), a frozen per-layer output scalar and final logit soft-capping.

The small models' options run too: per-layer input embeddings (``hidden_size_per_layer_input`` > 0, with
``vocab_size_per_layer_input``) and key/value sharing across the last ``num_kv_shared_layers`` layers (with
``use_double_wide_mlp`` widening their MLP). So does the mixture-of-experts block of the 26B-A4B model
(``enable_moe_block``: ``num_experts``, ``top_k_experts``, ``moe_intermediate_size``): every layer runs its dense
MLP and ``num_experts`` routed experts side by side, each branch between its own norms, which is
:class:`sftjax.models.moe.MoE` with the dense MLP as its shared expert and ``branch_norms``, the router's input
scale and its per-expert scale (HF ``router.proj``, ``router.scale``, ``router.per_expert_scale``; the experts
``experts.gate_up_proj`` [E, 2F, D] with the gate rows first and ``experts.down_proj`` [E, D, F], split and
transposed into our stacked projections by :func:`tensors_from_hf` and joined again by :func:`entries_to_hf`).
Bidirectional attention (``use_bidirectional_attention: all``) is refused with a one-line error. A
``Gemma4ForConditionalGeneration`` checkpoint is read as its text decoder (the ``text_config`` and the
``language_model`` tensors; vision and audio towers skipped) and saved back as ``Gemma4ForCausalLM``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from sftjax.errors import CheckpointError
from sftjax.models.config import FULL_ATTENTION, ModelConfig
from sftjax.models.moe_config import MoEConfig
from sftjax.models.families.common import (
    HF_ACTIVATIONS,
    TensorSpec,
    base_config,
    base_config_to_hf,
    hf_config_object,
    text_decoder_config,
    text_decoder_tensor_name,
    llama_like_specs,
)
from sftjax.models.families.gemma3 import full_rope, layer_types_list, per_layer_type_rope_to_hf, sliding_rope_theta

MODEL_TYPE = "gemma4_text"
ARCHITECTURES = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")  # the second read as its text decoder
FAMILY_KEYS = ("global_head_dim", "num_global_key_value_heads", "per_layer_config", "attention_k_eq_v",
               "hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers",
               "use_double_wide_mlp", "enable_moe_block", "use_bidirectional_attention", "num_experts",
               "top_k_experts", "moe_intermediate_size")


def _refuse_unsupported(cfg, source: str) -> None:
    if not 0 <= cfg.num_kv_shared_layers < cfg.num_hidden_layers:
        raise CheckpointError(f"{source}: num_kv_shared_layers={cfg.num_kv_shared_layers} must leave at least one of "
                              f"the {cfg.num_hidden_layers} layers computing its own keys and values")
    first_shared = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    missing = sorted(set(cfg.layer_types[first_shared:]) - set(cfg.layer_types[:first_shared]))
    if missing:
        raise CheckpointError(f"{source}: num_kv_shared_layers={cfg.num_kv_shared_layers}: no layer before the "
                              f"shared ones is a {missing[0]} layer to give them keys and values")
    if cfg.enable_moe_block:
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            value = getattr(cfg, key, None)
            if not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{source}: enable_moe_block=true needs {key} to be a positive integer, "
                                      f"got {value!r}")
        if cfg.top_k_experts > cfg.num_experts:
            raise CheckpointError(f"{source}: top_k_experts={cfg.top_k_experts} is larger than "
                                  f"num_experts={cfg.num_experts}")
        if cfg.use_double_wide_mlp and cfg.num_kv_shared_layers:
            raise CheckpointError(f"{source}: enable_moe_block=true with use_double_wide_mlp=true and "
                                  "num_kv_shared_layers > 0 is not supported (the MoE layers' dense MLP has one "
                                  "width)")
    if cfg.use_bidirectional_attention == "all":
        raise CheckpointError(f"{source}: use_bidirectional_attention='all' is not supported (causal LM only)")


def _layer_shape(cfg, layer_types, kind: str, source: str) -> tuple[int, int]:
    """(head_dim, num_kv_heads) of the layers of one kind; all of them must agree."""
    shapes = {(cfg.per_layer_config[i].head_dim, cfg.per_layer_config[i].num_key_value_heads)
              for i, t in enumerate(layer_types) if t == kind}
    if len(shapes) > 1:
        raise CheckpointError(f"{source}: per_layer_config gives the {kind} layers different head shapes "
                              f"{sorted(shapes)}; one shape per layer type is supported")
    return shapes.pop() if shapes else (cfg.head_dim, cfg.num_key_value_heads)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    import transformers.utils.logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers warns on each read of a per-layer attribute's global value
    try:
        return _config_from_hf(text_decoder_config(hf, ARCHITECTURES[0]), source)
    finally:
        hf_logging.set_verbosity(verbosity)


def _config_from_hf(hf: dict, source: str) -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    cfg.allow_global_per_layer_attribute_access = True  # the global head shape is the sliding layers' one
    _refuse_unsupported(cfg, source)
    layer_types = tuple(cfg.layer_types)
    sliding_shape = _layer_shape(cfg, layer_types, "sliding_attention", source)
    if sliding_shape != (cfg.head_dim, cfg.num_key_value_heads):
        raise CheckpointError(f"{source}: per_layer_config changes the sliding layers' head shape; only the full "
                              "layers' may differ")
    global_head_dim, global_kv_heads = _layer_shape(cfg, layer_types, FULL_ATTENTION, source)
    rope = full_rope(cfg)
    proportional = rope.get("rope_type") == "proportional"
    if proportional:  # read by the shared code as the default type, then switched
        rope["rope_type"] = "default"
    bias = bool(cfg.attention_bias)
    extras = {k: v for k, v in hf.items() if k not in FAMILY_KEYS}
    overrides = dict(rope_type="proportional") if proportional else {}
    return base_config(
        extras, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source, rope=rope,
        embedding_scale=cfg.hidden_size ** 0.5, sandwich_norms=True, qk_norm=True, v_norm=True, layer_scalar=True,
        attention_bias=bias, attention_out_bias=bias, sliding_window=cfg.sliding_window, layer_types=layer_types,
        sliding_rope_theta=sliding_rope_theta(cfg, source), query_pre_attn_scalar=1.0,
        global_head_dim=global_head_dim, global_num_kv_heads=global_kv_heads,
        attention_k_eq_v=bool(cfg.attention_k_eq_v), final_logit_softcap=cfg.final_logit_softcapping,
        per_layer_input_size=int(cfg.hidden_size_per_layer_input or 0),
        per_layer_vocab_size=int(cfg.vocab_size_per_layer_input) if cfg.hidden_size_per_layer_input else None,
        kv_shared_layers=int(cfg.num_kv_shared_layers or 0),
        double_wide_shared_mlp=bool(cfg.use_double_wide_mlp and cfg.num_kv_shared_layers),
        moe=_moe_config(cfg) if cfg.enable_moe_block else None, **overrides)


def _moe_config(cfg) -> MoEConfig:
    """The MoE block of every layer: the dense MLP is its shared expert; see the module docstring."""
    return MoEConfig(hidden_size=cfg.hidden_size, expert_intermediate_size=cfg.moe_intermediate_size,
                     num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k_experts, norm_topk_prob=True,
                     activation=HF_ACTIVATIONS[cfg.hidden_activation],
                     shared_expert_intermediate_size=cfg.intermediate_size, router_input_scale=True,
                     per_expert_scale=True, branch_norms=True, norm_eps=float(cfg.rms_norm_eps))


checkpoint_tensor_name = text_decoder_tensor_name  # a multimodal checkpoint's text decoder tensors, else None


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf["hidden_activation"] = hf.pop("hidden_act")
    rope = per_layer_type_rope_to_hf(config)
    if config.rope_type == "proportional":
        rope[FULL_ATTENTION] = {"rope_type": "proportional", "rope_theta": config.rope_theta,
                                "partial_rotary_factor": config.partial_rotary_factor}
        if config.rope_factor != 1.0:
            rope[FULL_ATTENTION]["factor"] = config.rope_factor
    layer_types = layer_types_list(config)
    full_shape = {"head_dim": config.global_head_dim or config.head_dim,
                  "num_key_value_heads": config.global_num_kv_heads or config.num_kv_heads}
    hf.update(attention_bias=config.attention_bias, sliding_window=config.sliding_window, layer_types=layer_types,
              rope_parameters=rope, final_logit_softcapping=config.final_logit_softcap,
              attention_k_eq_v=config.attention_k_eq_v, hidden_size_per_layer_input=config.per_layer_input_size,
              num_kv_shared_layers=config.kv_shared_layers, use_double_wide_mlp=config.double_wide_shared_mlp,
              enable_moe_block=config.moe is not None,
              per_layer_config={str(i): dict(full_shape) for i, t in enumerate(layer_types) if t == FULL_ATTENTION})
    if config.per_layer_input_size:
        hf["vocab_size_per_layer_input"] = config.per_layer_vocab_size or config.vocab_size
    if config.moe is not None:
        hf.update(num_experts=config.moe.num_experts, top_k_experts=config.moe.num_experts_per_tok,
                  moe_intermediate_size=config.moe.expert_intermediate_size)
    return hf


def _moe_specs(config: ModelConfig, layer: int) -> list[TensorSpec]:
    """An MoE layer's feed-forward tensors: the dense MLP (our shared expert) and its norms, the router, and the
    experts in the split names of :func:`tensors_from_hf` (our [E, in, out] layout)."""
    hf, ours = f"model.layers.{layer}", f"layers.{layer}.mlp"
    specs = [TensorSpec(f"{hf}.mlp.{proj}.weight", ((f"{ours}.shared_expert.{proj}.kernel", None, None),), True)
             for proj in ("gate_proj", "up_proj", "down_proj")]
    specs += [TensorSpec(f"{hf}.{name}.weight", ((f"{ours}.{norm}.weight", None, None),), False)
              for name, norm in (("post_feedforward_layernorm_1", "shared_expert_out_norm"),
                                 ("pre_feedforward_layernorm_2", "experts_norm"),
                                 ("post_feedforward_layernorm_2", "experts_out_norm"))]
    specs += [TensorSpec(f"{hf}.router.proj.weight", ((f"{ours}.router.kernel", None, None),), True),
              TensorSpec(f"{hf}.router.scale", ((f"{ours}.router.scale", None, None),), False),
              TensorSpec(f"{hf}.router.per_expert_scale", ((f"{ours}.router.per_expert_scale", None, None),), False)]
    specs += [TensorSpec(f"{hf}.experts.{proj}", ((f"{ours}.experts.{proj}.kernel", None, None),), False)
              for proj in ("gate_proj", "up_proj", "down_proj")]
    return specs


def weight_specs(config: ModelConfig):
    specs = []
    for spec in llama_like_specs(config, sandwich_norm_names=True, moe_specs=lambda i: _moe_specs(config, i)):
        parts = spec.hf_name.split(".")
        if parts[1] == "layers" and parts[3] == "pre_feedforward_layernorm" and config.is_moe_layer(int(parts[2])):
            spec = TensorSpec(spec.hf_name, ((f"layers.{parts[2]}.mlp.shared_expert_norm.weight", None, None),), False)
        if parts[1] == "layers" and parts[3] == "self_attn" and parts[4] in ("k_proj", "v_proj", "k_norm"):
            layer = int(parts[2])
            if config.kv_source(layer) is not None:
                continue  # the layer reuses an earlier layer's keys and values
            if config.attention_k_eq_v and parts[4] == "v_proj" and config.layer_type(layer) == FULL_ATTENTION:
                continue  # full layers take their values from k_proj
        specs.append(spec)
    for i in range(config.num_layers):
        specs.append(TensorSpec(f"model.layers.{i}.layer_scalar", ((f"layers.{i}.layer_scalar", None, None),), False))
    if config.per_layer_input_size:
        specs += [TensorSpec("model.embed_tokens_per_layer.weight", (("per_layer_embedding.embedding.embedding",
                                                                      None, None),), False),
                  TensorSpec("model.per_layer_model_projection.weight", (("per_layer_embedding.projection.kernel",
                                                                          None, None),), True),
                  TensorSpec("model.per_layer_projection_norm.weight", (("per_layer_embedding.norm.weight",
                                                                         None, None),), False)]
        for i in range(config.num_layers):
            hf, ours = f"model.layers.{i}", f"layers.{i}.per_layer"
            specs += [TensorSpec(f"{hf}.per_layer_input_gate.weight", ((f"{ours}.gate.kernel", None, None),), True),
                      TensorSpec(f"{hf}.per_layer_projection.weight", ((f"{ours}.projection.kernel", None, None),),
                                 True),
                      TensorSpec(f"{hf}.post_per_layer_input_norm.weight", ((f"{ours}.norm.weight", None, None),),
                                 False)]
    return specs


_EXPERTS = ".experts."


def tensors_from_hf(tensors: Iterable[tuple[str, np.ndarray]], config: ModelConfig, *,
                    source: str = "checkpoint") -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint stream in the names of :func:`weight_specs`: each layer's ``experts.gate_up_proj``
    [E, 2F, D] split into ``experts.gate_proj`` / ``experts.up_proj`` [E, D, F], ``experts.down_proj`` [E, D, F]
    transposed to [E, F, D]."""
    moe = config.moe
    for name, array in tensors:
        prefix, _, rest = name.rpartition(_EXPERTS)
        if moe is None or rest not in ("gate_up_proj", "down_proj") or not prefix:
            yield name, array
            continue
        e, d, f = moe.num_experts, moe.hidden_size, moe.expert_intermediate_size
        want = (e, 2 * f, d) if rest == "gate_up_proj" else (e, d, f)
        if tuple(array.shape) != want:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(array.shape)} but config.json implies "
                                  f"{list(want)}")
        array = np.asarray(array)
        if rest == "down_proj":
            yield f"{prefix}{_EXPERTS}down_proj", np.ascontiguousarray(array.transpose(0, 2, 1))
        else:
            yield f"{prefix}{_EXPERTS}gate_proj", np.ascontiguousarray(array[:, :f].transpose(0, 2, 1))
            yield f"{prefix}{_EXPERTS}up_proj", np.ascontiguousarray(array[:, f:].transpose(0, 2, 1))


def entries_to_hf(entries: list, config: ModelConfig) -> list:
    """Exporter entries (name, nbytes, produce) in the checkpoint's names: gate and up joined into
    ``experts.gate_up_proj``, ``experts.down_proj`` transposed back."""
    if config.moe is None:
        return entries
    by_name = {name: (nbytes, produce) for name, nbytes, produce in entries}
    out = []
    for name, nbytes, produce in entries:
        prefix, _, rest = name.rpartition(_EXPERTS)
        if not prefix or rest not in ("gate_proj", "up_proj", "down_proj"):
            out.append((name, nbytes, produce))
        elif rest == "down_proj":
            out.append((name, nbytes, lambda produce=produce: np.ascontiguousarray(produce().transpose(0, 2, 1))))
        elif rest == "gate_proj":
            up_bytes, up = by_name[f"{prefix}{_EXPERTS}up_proj"]

            def gate_up(gate=produce, up=up):
                return np.ascontiguousarray(np.concatenate([gate().transpose(0, 2, 1), up().transpose(0, 2, 1)],
                                                           axis=1))

            out.append((f"{prefix}{_EXPERTS}gate_up_proj", nbytes + up_bytes, gate_up))
    return out
