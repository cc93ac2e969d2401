"""gpt-oss: Llama-style blocks with biased q/k/v/o projections, a learned sink logit per attention head,
alternating sliding-window and full layers, YaRN RoPE, and on every layer a mixture of experts whose router keeps
the top-k logits (with a bias) before a softmax over those k, and whose experts run the clamped SwiGLU with biases.

Checkpoint layout: the experts are stored stacked, ``mlp.experts.gate_up_proj`` [E, D, 2F] with the gate and up
columns interleaved (0, 2, 4... gate; 1, 3, 5... up) and ``down_proj`` [E, F, D], each with a bias; the Hub files
keep them as MXFP4 ``*_blocks`` / ``*_scales`` pairs (``quantization_config.quant_method: mxfp4``), which
:func:`tensors_from_hf` dequantizes while streaming. The interleaved tensors are split on the way in into the
``experts.gate_proj`` / ``experts.up_proj`` parameters of :class:`sftjax.models.moe.MoE` and interleaved again on
the way out; exports are written unquantized (in the parameter dtype), without ``quantization_config``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from sftjax.errors import CheckpointError
from sftjax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from sftjax.models.families.common import (
    TensorSpec,
    base_config,
    base_config_to_hf,
    hf_config_object,
    layer_types_to_hf,
    llama_like_specs,
)
from sftjax.models.families.moe_common import moe_fields, moe_to_hf
from sftjax.models.mxfp4 import dequantize_mxfp4_tensors

MODEL_TYPE = "gpt_oss"
ARCHITECTURES = ("GptOssForCausalLM",)
# our per-projection names of the interleaved HF tensors, as they travel between the two
_SPLIT = {"experts.gate_up_proj": ("experts.gate_proj", "experts.up_proj"),
          "experts.gate_up_proj_bias": ("experts.gate_proj_bias", "experts.up_proj_bias")}


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    quantization = hf.get("quantization_config")
    if quantization and quantization.get("quant_method") != "mxfp4":
        raise CheckpointError(f"{source}: quantization_config.quant_method={quantization.get('quant_method')!r} "
                              "is not supported for gpt-oss (supported: mxfp4, dequantized on load)")
    hf = {k: v for k, v in hf.items() if k != "quantization_config"}  # exports are unquantized
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    layer_types = tuple(cfg.layer_types)
    unknown = sorted(set(layer_types) - {SLIDING_ATTENTION, FULL_ATTENTION})
    if unknown:
        raise CheckpointError(f"{source}: layer_types entry {unknown[0]!r} is not supported "
                              f"(supported: {SLIDING_ATTENTION}, {FULL_ATTENTION})")
    return base_config(hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source,
                       attention_bias=bool(cfg.attention_bias), attention_out_bias=bool(cfg.attention_bias),
                       attention_sinks=True, sliding_window=cfg.sliding_window, layer_types=layer_types,
                       **moe_fields(cfg, MODEL_TYPE, source=source))


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    moe = config.moe
    hf.update(attention_bias=config.attention_bias, sliding_window=config.sliding_window,
              layer_types=layer_types_to_hf(config), num_local_experts=moe.num_experts,
              intermediate_size=moe.expert_intermediate_size, swiglu_alpha=moe.swiglu_alpha,
              swiglu_limit=moe.swiglu_limit, **moe_to_hf(config))
    return hf


def _moe_specs(config: ModelConfig, layer: int) -> list[TensorSpec]:
    hf, ours = f"model.layers.{layer}.mlp", f"layers.{layer}.mlp"
    specs = [TensorSpec(f"{hf}.router.weight", ((f"{ours}.router.kernel", None, None),), True),
             TensorSpec(f"{hf}.router.bias", ((f"{ours}.router.bias", None, None),), False)]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        specs.append(TensorSpec(f"{hf}.experts.{proj}", ((f"{ours}.experts.{proj}.kernel", None, None),), False))
        specs.append(TensorSpec(f"{hf}.experts.{proj}_bias", ((f"{ours}.experts.{proj}.bias", None, None),), False))
    return specs


def weight_specs(config: ModelConfig):
    specs = llama_like_specs(config, moe_specs=lambda i: _moe_specs(config, i))
    for i in range(config.num_layers):
        specs.append(TensorSpec(f"model.layers.{i}.self_attn.sinks", ((f"layers.{i}.attn.sinks", None, None),),
                                False))
    return specs


def tensors_from_hf(tensors: Iterable[tuple[str, np.ndarray]], config: ModelConfig, *,
                    source: str = "checkpoint") -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint stream in the names of :func:`weight_specs`: MXFP4 pairs dequantized, the interleaved
    gate/up tensors split in two."""
    for name, array in dequantize_mxfp4_tensors(tensors, source=source):
        prefix, _, rest = name.partition(".mlp.")
        if rest in _SPLIT:
            gate, up = _SPLIT[rest]
            array = np.asarray(array)
            if array.shape[-1] % 2:
                raise CheckpointError(f"{source}: tensor {name} has an odd last axis {array.shape[-1]} "
                                      "(gate and up columns come interleaved in pairs)")
            yield f"{prefix}.mlp.{gate}", np.ascontiguousarray(array[..., 0::2])
            yield f"{prefix}.mlp.{up}", np.ascontiguousarray(array[..., 1::2])
        else:
            yield name, array


def entries_to_hf(entries: list, config: ModelConfig) -> list:
    """Exporter entries (name, nbytes, produce) in the checkpoint's names: the split gate/up pairs interleaved."""
    by_name = {name: (nbytes, produce) for name, nbytes, produce in entries}
    fused_of = {f"{ours}": fused for fused, pair in _SPLIT.items() for ours in pair}
    out = []
    for name, nbytes, produce in entries:
        prefix, _, rest = name.partition(".mlp.")
        if rest not in fused_of:
            out.append((name, nbytes, produce))
            continue
        fused = fused_of[rest]
        if rest != _SPLIT[fused][0]:
            continue  # the up half is written with its gate half
        up_bytes, up_produce = by_name[f"{prefix}.mlp.{_SPLIT[fused][1]}"]

        def interleaved(gate=produce, up=up_produce):
            g, u = gate(), up()
            both = np.empty(g.shape[:-1] + (2 * g.shape[-1],), g.dtype)
            both[..., 0::2], both[..., 1::2] = g, u
            return both

        out.append((f"{prefix}.mlp.{fused}", nbytes + up_bytes, interleaved))
    return out
