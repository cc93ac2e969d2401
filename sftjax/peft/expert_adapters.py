"""Per-expert LoRA adapters in PEFT's form: ``target_parameters`` on transformers' fused expert tensors.

transformers 5 holds the experts of Mixtral and Qwen2/3-MoE as ``mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows
first) and ``mlp.experts.down_proj`` [E, D, F] (Gemma 4: ``experts.gate_up_proj`` / ``experts.down_proj``, the
same layout on the layer itself), and peft adapts such a 3-D parameter with one ``lora_A`` [E*R, in]
and one ``lora_B`` [out, R*E] (``ParamWrapper``: expert e's factors are rows ``e*R .. e*R+R`` of A and the columns
``j*E + e`` of B; the update of expert e is ``B_e @ A_e`` in the parameter's [out, in] layout). Ours are three
stacked projections with ``lora_a`` [E, r, in], ``lora_b`` [E, r, out]; written to peft:

* gate_up_proj gets rank ``r_gate + r_up``: A_e stacks the gate and up A's, B_e is block-diagonal (gate rows of the
  fused output take the gate's B, up rows the up's), so ``B_e @ A_e`` is exactly the two updates one above the
  other (zero for a projection without adapter);
* every expert parameter of the model gets the same rank R, the adapter's global ``r`` (peft's ``rank_pattern``
  does not reach target_parameters; the other modules get their rank through it): down_proj's factors are padded
  with zeros to R, which changes no update; ``lora_alpha`` is the alpha for which peft's scale (alpha/R, or
  alpha/sqrt(R) with rsLoRA) equals ours.

peft wraps the parameters in the order of ``target_parameters``: with both, the first (gate_up_proj) is the inner
wrapper, whose tensors are named ``experts.base_layer.lora_A.weight``, the second ``experts.lora_A.weight``.
gpt-oss stores its experts ``[E, in, out]`` with gate and up columns interleaved (``gate_up_proj`` [E, D, 2F]:
even columns gate, odd up); peft transposes by itself for that layout, so only the fused output rows of B differ
(even rows gate, odd rows up). Other expert layouts are a one-line CheckpointError: the export then writes the
merged model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sftjax.errors import CheckpointError
from sftjax.sharding import to_host

FUSED_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "gemma4_text")  # gate_up_proj / down_proj
INTERLEAVED_FAMILIES = ("gpt_oss",)  # gate and up columns alternate in gate_up_proj
EXPERTS_MODULE = {"gemma4_text": "experts"}  # the experts' module in a layer, where it is not mlp.experts


@dataclasses.dataclass
class ExpertAdapters:
    tensors: dict  # PEFT tensor name (without ``base_model.model.``) -> numpy array
    target_parameters: list  # peft's target_parameters, in wrapping order
    rank: int  # R of every expert parameter
    scale: float  # ours (alpha/r or alpha/sqrt(r)), the same for every expert adapter


def _factors(module):
    """(A [E, r, in], B [E, out, r]) of an ExpertLinear in peft's orientation, or None without adapter."""
    if module.lora_a is None:
        return None
    a = to_host(module.lora_a[...])  # stored [E, r, in] already
    b = to_host(module.lora_b[...]).transpose(0, 2, 1)
    return a, b


def expert_peft_tensors(model, model_config) -> ExpertAdapters | None:
    """The per-expert adapters of ``model`` as peft tensors; None when no expert has an adapter."""
    from sftjax.models.moe import MoE
    from sftjax.models.scan import unstacked

    model = unstacked(model)
    blocks = {index: layer.mlp for index, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)}
    adapted = {index: {name: _factors(getattr(block.experts, f"{name}_proj")) for name in ("gate", "up", "down")}
               for index, block in blocks.items()}
    if not any(f is not None for parts in adapted.values() for f in parts.values()):
        return None
    if model_config.family not in FUSED_FAMILIES:
        raise CheckpointError(f"per-expert LoRA adapters of {model_config.architecture} have no PEFT adapter form "
                              "here; export --format hf (merged)")
    layouts = {tuple(f is not None for f in parts.values()) for parts in adapted.values()}
    if len(layouts) != 1:
        raise CheckpointError("per-expert LoRA adapters differ between MoE layers; peft's target_parameters apply "
                              "to every layer: export --format hf (merged)")
    has_gate, has_up, has_down = layouts.pop()
    scales = {float(getattr(block.experts, f"{name}_proj").lora_scale) for block in blocks.values()
              for name, has in zip(("gate", "up", "down"), (has_gate, has_up, has_down)) if has}
    if len(scales) != 1:
        raise CheckpointError(f"per-expert LoRA adapters have different scales {sorted(scales)}; PEFT needs one")

    def rank(parts, name):
        return parts[name][0].shape[1] if parts[name] is not None else 0

    ranks = {max(rank(p, "gate") + rank(p, "up"), rank(p, "down")) for p in adapted.values()}
    total = max(ranks)
    module = EXPERTS_MODULE.get(model_config.family, "mlp.experts")
    gate_up_name, down_name = f"{module}.gate_up_proj", f"{module}.down_proj"
    targets = ([gate_up_name] if has_gate or has_up else []) + ([down_name] if has_down else [])
    tensors = {}
    moe = model_config.moe
    experts, dim, width = moe.num_experts, moe.hidden_size, moe.expert_intermediate_size
    for index, parts in adapted.items():
        prefix = f"model.layers.{index}.{module}"
        names = {gate_up_name: f"{prefix}.base_layer" if len(targets) == 2 else prefix, down_name: prefix}
        if has_gate or has_up:
            a = np.zeros((experts, total, dim), np.float32)
            b = np.zeros((experts, 2 * width, total), np.float32)
            offset = 0
            if model_config.family in INTERLEAVED_FAMILIES:
                halves = (("gate", slice(0, 2 * width, 2)), ("up", slice(1, 2 * width, 2)))
            else:
                halves = (("gate", slice(0, width)), ("up", slice(width, 2 * width)))
            for name, rows in halves:
                if parts[name] is None:
                    continue
                a_part, b_part = parts[name]
                r = a_part.shape[1]
                a[:, offset:offset + r] = a_part
                b[:, rows, offset:offset + r] = b_part
                offset += r
            tensors.update(_peft_pair(names[gate_up_name], a, b))
        if has_down:
            a_part, b_part = parts["down"]
            r = a_part.shape[1]
            a = np.zeros((experts, total, width), np.float32)
            b = np.zeros((experts, dim, total), np.float32)
            a[:, :r], b[:, :, :r] = a_part, b_part
            tensors.update(_peft_pair(names[down_name], a, b))
    return ExpertAdapters(tensors=tensors, target_parameters=targets, rank=int(total), scale=scales.pop())


def _peft_pair(name: str, a_ERI, b_EOR) -> dict:
    """peft's ParamWrapper tensors: lora_A [E*R, in] (expert-major rows), lora_B [out, R*E] (column j*E + e)."""
    experts, rank, in_features = a_ERI.shape
    out_features = b_EOR.shape[1]
    weight_a = a_ERI.reshape(experts * rank, in_features)
    weight_b = b_EOR.transpose(1, 2, 0).reshape(out_features, rank * experts)
    return {f"{name}.lora_A.weight": weight_a, f"{name}.lora_B.weight": weight_b}
