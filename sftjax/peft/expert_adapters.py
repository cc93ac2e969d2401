"""Per-expert LoRA adapters of the stacked MoE experts in peft's form (``target_parameters``).

peft adapts a 3-D expert parameter ``[E, ., .]`` of a transformers model (its ``ParamWrapper``) with one
``lora_A`` of shape ``[E * R, in]`` (expert-major: row ``e * R + k``) and one ``lora_B`` of shape ``[out, R * E]``
(column ``k * E + e``), and adds to expert ``e`` the update ``scale' * A_e^T B_e^T`` in the ``x @ W`` orientation
(it transposes by itself for layouts stored ``[E, out, in]``). Our expert adapters are ``lora_a [E, in, r]`` and
``lora_b [E, r, out]`` per projection, so ``A_e = lora_a[e]^T`` and ``B_e = lora_b[e]^T``.

transformers keeps gate and up fused in one parameter, ``mlp.experts.gate_up_proj``: gate columns then up columns
(Mixtral, Qwen3-MoE), or interleaved (gpt-oss). Two rank-r adapters on gate and up are exactly one rank-2r
adapter on the fused parameter: A stacks the two A's, B is block-diagonal with the gate and up B's placed in the
fused output columns. ``down_proj`` maps one to one. peft's scale for a wrapped parameter is ``lora_alpha / R``
(``/ sqrt(R)`` with rsLoRA) with R its rank; the ratio to our scale is folded into B, so one ``lora_alpha``
serves every module. Several target parameters of one module nest in peft: the first listed sits innermost
(``experts.base_layer.lora_A``), the last outermost (``experts.lora_A``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sftjax.errors import CheckpointError
from sftjax.sharding import to_host

# family -> how transformers fuses gate and up: "halves" (gate columns first) or "interleaved"
FUSED_GATE_UP = {"mixtral": "halves", "qwen3_moe": "halves", "gpt_oss": "interleaved"}
_ORDER = ("gate_up_proj", "down_proj")  # the order of target_parameters (and so of peft's nesting)


def has_peft_form(model_config) -> bool:
    return model_config.family in FUSED_GATE_UP


def _factors(module):
    if module is None or getattr(module, "lora_a", None) is None:
        return None
    return (np.asarray(to_host(module.lora_a[...]), np.float32), np.asarray(to_host(module.lora_b[...]), np.float32),
            float(module.lora_scale))


def _fused_gate_up(gate, up, layout: str, experts: int, hidden: int, width: int, rank: int):
    """(A [E, 2r, D], B [E, 2F, 2r], scale) of the fused gate_up parameter from the gate and up factors (a
    missing one contributes zeros)."""
    a = np.zeros((experts, 2 * rank, hidden), np.float32)
    b = np.zeros((experts, 2 * width, 2 * rank), np.float32)
    scale = None
    for slot, factors in enumerate((gate, up)):
        if factors is None:
            continue
        lora_a, lora_b, scale = factors  # [E, D, r], [E, r, F]
        a[:, slot * rank:(slot + 1) * rank] = lora_a.transpose(0, 2, 1)
        rows = slice(slot * width, (slot + 1) * width) if layout == "halves" else slice(slot, None, 2)
        b[:, rows, slot * rank:(slot + 1) * rank] = lora_b.transpose(0, 2, 1)
    return a, b, scale


def expert_peft_tensors(model, model_config, peft_scale: Callable[[int], float], dtype) -> tuple[list[str], dict]:
    """(peft's ``target_parameters``, {tensor name: array}) of every per-expert adapter of ``model`` (unstacked)."""
    from sftjax.models.moe import MoE

    if not has_peft_form(model_config):
        raise CheckpointError(f"per-expert LoRA adapters have no PEFT form for {model_config.architecture}; "
                              "export --format hf (merged)")
    layout = FUSED_GATE_UP[model_config.family]
    targets: set[str] = set()
    tensors = {}
    layers = []
    for index, layer in enumerate(model.layers):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, MoE):
            continue
        experts = mlp.experts
        gate, up, down = (_factors(getattr(experts, name, None)) for name in ("gate_proj", "up_proj", "down_proj"))
        params = {}
        if gate is not None or up is not None:
            some = gate or up
            num, hidden, rank = some[0].shape
            width = some[1].shape[2]
            params["gate_up_proj"] = _fused_gate_up(gate, up, layout, num, hidden, width, rank)
        if down is not None:
            params["down_proj"] = (down[0].transpose(0, 2, 1), down[1].transpose(0, 2, 1), down[2])
        if params:
            layers.append((index, params))
            targets.update(params)
    order = [name for name in _ORDER if name in targets]
    for index, params in layers:
        if set(params) != set(order):
            raise CheckpointError(f"layer {index}: LoRA on some expert projections of a layer but not on the same "
                                  "ones in every layer has no single PEFT target_parameters; export --format hf")
        for position, name in enumerate(order):
            a, b, scale = params[name]  # A [E, R, in], B [E, out, R]
            rank = a.shape[1]
            b = b * (scale / peft_scale(rank))
            prefix = f"base_model.model.model.layers.{index}.mlp.experts." + "base_layer." * (len(order) - 1 - position)
            tensors[prefix + "lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[2]).astype(dtype))
            tensors[prefix + "lora_B.weight"] = np.ascontiguousarray(
                b.transpose(1, 2, 0).reshape(b.shape[1], -1).astype(dtype))
    return [f"mlp.experts.{name}" for name in order], tensors
