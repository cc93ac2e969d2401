"""What the MoE family files share: the MoE block of a transformers config, and its tensors in the family's
weight table (per-expert HF tensors fill one slot of our stacked expert parameters; see
:mod:`sftjax.models.moe_weights` for the layouts)."""

from __future__ import annotations

from sftjax.errors import CheckpointError
from sftjax.models.config import ModelConfig
from sftjax.models.families.common import TensorSpec
from sftjax.models.moe_weights import moe_config_from_hf, moe_weight_specs


def moe_fields(cfg, model_type: str, *, source: str) -> dict:
    """ModelConfig fields of the MoE block: ``moe`` plus the dense/sparse layer choice of the Qwen families."""
    fields = dict(moe=moe_config_from_hf(cfg, model_type, source=source))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        layers = tuple(int(i) for i in (getattr(cfg, "mlp_only_layers", None) or ()))
        bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise CheckpointError(f"{source}: mlp_only_layers has layer {bad[0]} outside "
                                  f"0..{cfg.num_hidden_layers - 1}")
        step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
        if step < 1:
            raise CheckpointError(f"{source}: decoder_sparse_step={step} must be >= 1")
        fields.update(mlp_only_layers=layers, decoder_sparse_step=step)
    return fields


def moe_to_hf(config: ModelConfig) -> dict:
    """The MoE keys every family writes (the family adds its own names for the expert count and width)."""
    moe = config.moe
    return dict(num_experts_per_tok=moe.num_experts_per_tok, router_aux_loss_coef=moe.router_aux_loss_coef)


def moe_layer_specs(config: ModelConfig, layer: int, *, block: str, style: str) -> list[TensorSpec]:
    """The HF tensors of layer ``layer``'s MoE block (``model.layers.{layer}.{block}.*``) as TensorSpecs, ordered
    by parameter, then expert (an exporter then reads one stacked parameter at a time)."""
    specs = []
    for spec in moe_weight_specs(config.moe, style):
        if spec.kind not in ("linear", "same"):
            raise CheckpointError(f"model config: the {style} MoE layout's {spec.hf_name} is not a per-tensor map")
        targets = tuple((f"layers.{layer}.mlp.{path}", None, None) for path in spec.params)
        specs.append(TensorSpec(f"model.layers.{layer}.{block}.{spec.hf_name}", targets, spec.kind == "linear",
                                expert=spec.expert))
    return sorted(specs, key=lambda s: (s.targets[0][0], -1 if s.expert is None else s.expert))
