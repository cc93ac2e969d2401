"""Hugging Face tensor names of MoE blocks <-> the stacked arrays of :class:`sftjax.models.moe.MoE`.

Checkpoints store experts in one of these layouts (names relative to the block, e.g.
``model.layers.3.block_sparse_moe`` for Mixtral files, ``model.layers.3.mlp`` for the others):

``mixtral``   files on the Hub (and what transformers 5 writes back): ``gate.weight`` [E, D],
              ``experts.{e}.w1.weight`` (gate) / ``w3`` (up) [F, D], ``experts.{e}.w2.weight`` (down) [D, F].
``qwen_moe``  Qwen2-MoE / Qwen3-MoE files: ``gate.weight``, ``experts.{e}.{gate,up,down}_proj.weight`` and, with a
              shared expert, ``shared_expert.{gate,up,down}_proj.weight`` and ``shared_expert_gate.weight`` [1, D].
``fused``     transformers 5's in-memory layout of those families (its loader fuses the files):
              ``experts.gate_up_proj`` [E, 2F, D] (gate rows first), ``experts.down_proj`` [E, D, F].
``gpt_oss``   gpt-oss (files and memory alike, once MXFP4 is dequantized): ``router.weight`` [E, D],
              ``router.bias`` [E], ``experts.gate_up_proj`` [E, D, 2F] with gate and up *interleaved* (columns
              0, 2, 4... gate, 1, 3, 5... up), ``experts.gate_up_proj_bias`` [E, 2F], ``experts.down_proj``
              [E, F, D], ``experts.down_proj_bias`` [E, D].

Ours: ``router.kernel`` [D, E] (+ ``router.bias``), ``experts.{gate,up,down}_proj.kernel`` [E, in, out]
(+ ``.bias`` [E, out]), ``shared_expert.{gate,up,down}_proj.kernel`` [in, out], ``shared_expert_gate.kernel``
[D, 1]. :func:`moe_weight_specs` lists one :class:`ExpertTensorSpec` per HF tensor; :func:`place_hf_tensor`
turns one streamed HF tensor into the pieces of our parameters it fills (a per-expert tensor fills one slot of
the stacked axis), :func:`hf_tensor_from_params` builds one HF tensor for export, and the two dict-level helpers
do a whole block at once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from sftjax.errors import CheckpointError
from sftjax.models.moe import MoEConfig

MOE_WEIGHT_STYLES = ("mixtral", "qwen_moe", "fused", "gpt_oss")
_PER_EXPERT_NAMES = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
                     "qwen_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}


@dataclasses.dataclass(frozen=True)
class ExpertTensorSpec:
    hf_name: str  # relative to the block's prefix
    hf_shape: tuple[int, ...]
    params: tuple[str, ...]  # our parameter paths (relative to the MoE module) that this tensor fills
    expert: int | None  # the slot on the stacked expert axis, for per-expert tensors
    kind: str  # how the HF array maps to ours, see place_hf_tensor


def _shared_specs(c: MoEConfig) -> list[ExpertTensorSpec]:
    specs = []
    if c.shared_expert_intermediate_size:
        d, s = c.hidden_size, c.shared_expert_intermediate_size
        for proj, shape in (("gate_proj", (s, d)), ("up_proj", (s, d)), ("down_proj", (d, s))):
            specs.append(ExpertTensorSpec(f"shared_expert.{proj}.weight", shape, (f"shared_expert.{proj}.kernel",),
                                          None, "linear"))
    if c.shared_expert_gate:
        specs.append(ExpertTensorSpec("shared_expert_gate.weight", (1, c.hidden_size), ("shared_expert_gate.kernel",),
                                      None, "linear"))
    return specs


def moe_weight_specs(config: MoEConfig, style: str) -> list[ExpertTensorSpec]:
    """Every HF tensor of one MoE block in ``style``; a switch the style cannot hold is a CheckpointError."""
    c = config
    e, d, f = c.num_experts, c.hidden_size, c.expert_intermediate_size
    if style not in MOE_WEIGHT_STYLES:
        raise CheckpointError(f"MoE weight style {style!r} is not one of {', '.join(MOE_WEIGHT_STYLES)}")
    if style == "gpt_oss":
        if c.shared_expert_intermediate_size or not (c.expert_bias and c.router_bias):
            raise CheckpointError("gpt_oss MoE weights need expert and router biases and no shared expert")
        return [
            ExpertTensorSpec("router.weight", (e, d), ("router.kernel",), None, "linear"),
            ExpertTensorSpec("router.bias", (e,), ("router.bias",), None, "same"),
            ExpertTensorSpec("experts.gate_up_proj", (e, d, 2 * f),
                             ("experts.gate_proj.kernel", "experts.up_proj.kernel"), None, "interleaved"),
            ExpertTensorSpec("experts.gate_up_proj_bias", (e, 2 * f),
                             ("experts.gate_proj.bias", "experts.up_proj.bias"), None, "interleaved"),
            ExpertTensorSpec("experts.down_proj", (e, f, d), ("experts.down_proj.kernel",), None, "same"),
            ExpertTensorSpec("experts.down_proj_bias", (e, d), ("experts.down_proj.bias",), None, "same"),
        ]
    if c.expert_bias or c.router_bias:
        raise CheckpointError(f"{style} MoE weights have no expert or router biases")
    if c.router_input_scale or c.per_expert_scale or c.branch_norms:
        raise CheckpointError(f"{style} MoE weights have no router scales or branch norms (Gemma 4's block)")
    if style == "mixtral" and c.shared_expert_intermediate_size:
        raise CheckpointError("mixtral MoE weights have no shared expert")
    specs = [ExpertTensorSpec("gate.weight", (e, d), ("router.kernel",), None, "linear")]
    if style == "fused":
        specs += [
            ExpertTensorSpec("experts.gate_up_proj", (e, 2 * f, d),
                             ("experts.gate_proj.kernel", "experts.up_proj.kernel"), None, "stacked_halves"),
            ExpertTensorSpec("experts.down_proj", (e, d, f), ("experts.down_proj.kernel",), None, "stacked_linear"),
        ]
    else:
        names = _PER_EXPERT_NAMES[style]
        for expert in range(e):
            for ours, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
                specs.append(ExpertTensorSpec(f"experts.{expert}.{names[ours]}.weight", shape,
                                              (f"experts.{ours}_proj.kernel",), expert, "linear"))
    return specs + _shared_specs(c)


def place_hf_tensor(spec: ExpertTensorSpec, array) -> list[tuple[str, int | None, np.ndarray]]:
    """(our param path, expert slot or None for the whole param, value) for each piece ``array`` fills."""
    a = np.asarray(array)
    if tuple(a.shape) != tuple(spec.hf_shape):
        raise CheckpointError(f"tensor {spec.hf_name} has shape {list(a.shape)} but the config implies "
                              f"{list(spec.hf_shape)}")
    if spec.kind == "linear":
        values = [a.T]
    elif spec.kind == "same":
        values = [a]
    elif spec.kind == "stacked_linear":
        values = [a.transpose(0, 2, 1)]
    elif spec.kind == "stacked_halves":
        half = a.shape[1] // 2
        values = [a[:, :half].transpose(0, 2, 1), a[:, half:].transpose(0, 2, 1)]
    elif spec.kind == "interleaved":
        values = [a[..., 0::2], a[..., 1::2]]
    else:
        raise ValueError(f"unknown tensor kind {spec.kind!r}")
    return [(path, spec.expert, np.ascontiguousarray(v)) for path, v in zip(spec.params, values)]


def hf_tensor_from_params(spec: ExpertTensorSpec, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """The HF tensor of ``spec`` from our parameters (``get(path)`` returns a whole parameter as numpy)."""
    parts = [np.asarray(get(path)) for path in spec.params]
    if spec.expert is not None:
        parts = [p[spec.expert] for p in parts]
    if spec.kind == "linear":
        out = parts[0].T
    elif spec.kind == "same":
        out = parts[0]
    elif spec.kind == "stacked_linear":
        out = parts[0].transpose(0, 2, 1)
    elif spec.kind == "stacked_halves":
        out = np.concatenate([p.transpose(0, 2, 1) for p in parts], axis=1)
    elif spec.kind == "interleaved":
        gate, up = parts
        out = np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])
    else:
        raise ValueError(f"unknown tensor kind {spec.kind!r}")
    return np.ascontiguousarray(out)


def moe_param_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter paths of one MoE block and their shapes."""
    c = config
    e, d, f = c.num_experts, c.hidden_size, c.expert_intermediate_size
    shapes = {"router.kernel": (d, e)}
    if c.router_bias:
        shapes["router.bias"] = (e,)
    if c.router_input_scale:
        shapes["router.scale"] = (d,)
    if c.per_expert_scale:
        shapes["router.per_expert_scale"] = (e,)
    for proj, (i, o) in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
        shapes[f"experts.{proj}.kernel"] = (e, i, o)
        if c.expert_bias:
            shapes[f"experts.{proj}.bias"] = (e, o)
    if c.shared_expert_intermediate_size:
        s = c.shared_expert_intermediate_size
        for proj, shape in (("gate_proj", (d, s)), ("up_proj", (d, s)), ("down_proj", (s, d))):
            shapes[f"shared_expert.{proj}.kernel"] = shape
    if c.shared_expert_gate:
        shapes["shared_expert_gate.kernel"] = (d, 1)
    if c.branch_norms:
        for norm in ("shared_expert_norm", "shared_expert_out_norm", "experts_norm", "experts_out_norm"):
            shapes[f"{norm}.weight"] = (d,)
    return shapes


def moe_params_from_hf(config: MoEConfig, style: str, tensors: Mapping[str, np.ndarray], *,
                       prefix: str = "", source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Our parameters of one block from its HF tensors (``prefix`` + relative name); every expected tensor must
    be there, and no tensor under ``prefix`` may be left over."""
    shapes = moe_param_shapes(config)
    out = {path: None for path in shapes}
    specs = moe_weight_specs(config, style)
    used = set()
    for spec in specs:
        name = prefix + spec.hf_name
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name} ({style} MoE layout)")
        used.add(name)
        try:
            pieces = place_hf_tensor(spec, tensors[name])
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error} ({prefix or 'block'})") from None
        for path, expert, value in pieces:
            if expert is None:
                out[path] = value
            else:
                if out[path] is None:
                    out[path] = np.zeros(shapes[path], value.dtype)
                out[path][expert] = value
    extra = sorted(n for n in tensors if n.startswith(prefix) and n not in used)
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]} for the {style} MoE layout")
    return out


def moe_params_to_hf(config: MoEConfig, style: str, params: Mapping[str, np.ndarray], *,
                     prefix: str = "") -> dict[str, np.ndarray]:
    """The block's HF tensors (``prefix`` + relative name) from our parameters (paths as in moe_param_shapes)."""
    return {prefix + spec.hf_name: hf_tensor_from_params(spec, lambda p: params[p])
            for spec in moe_weight_specs(config, style)}


def module_params(moe, *, merge_lora: bool = True) -> dict[str, np.ndarray]:
    """The parameters of an ``MoE`` module as numpy (expert kernels with their LoRA merged when asked)."""
    out = {}
    for path in moe_param_shapes(moe.config):
        *parents, attribute = path.split(".")
        node = moe
        for part in parents:
            node = getattr(node, part)
        if merge_lora and attribute == "kernel" and hasattr(node, "merged_kernel"):
            value = node.merged_kernel()
        elif attribute == "kernel" and hasattr(node, "base_kernel"):  # dequantized when quantized
            value = node.base_kernel()
        else:
            value = getattr(node, attribute)[...]
        out[path] = np.asarray(value)
    return out


def set_module_params(moe, params: Mapping[str, np.ndarray]) -> None:
    """Write our-layout arrays into an ``MoE`` module (shapes checked)."""
    import jax.numpy as jnp

    for path, shape in moe_param_shapes(moe.config).items():
        value = np.asarray(params[path])
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"MoE parameter {path} has shape {list(value.shape)}, expected {list(shape)}")
        *parents, attribute = path.split(".")
        node = moe
        for part in parents:
            node = getattr(node, part)
        variable = getattr(node, attribute)
        variable.set_value(jnp.asarray(value, variable.get_value().dtype))


def moe_config_from_hf(cfg, model_type: str, *, source: str = "config.json", **overrides) -> MoEConfig:
    """The MoEConfig of a transformers config object (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``gpt_oss``);
    the per-layer choice (``mlp_only_layers``, ``decoder_sparse_step``) belongs to the decoder config."""
    from sftjax.errors import ConfigError
    from sftjax.models.families.common import HF_ACTIVATIONS

    if float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0) != 0.0:
        raise ConfigError(f"{source}: router_jitter_noise={cfg.router_jitter_noise} is not supported (use 0)")
    common = dict(hidden_size=cfg.hidden_size, num_experts_per_tok=cfg.num_experts_per_tok,
                  router_aux_loss_coef=float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0))
    if model_type == "gpt_oss":
        fields = dict(common, expert_intermediate_size=cfg.intermediate_size, num_experts=cfg.num_local_experts,
                      router_order="topk_softmax", norm_topk_prob=False, router_bias=True, expert_bias=True,
                      activation="clamped_swiglu", swiglu_alpha=float(getattr(cfg, "swiglu_alpha", 1.702)),
                      swiglu_limit=float(cfg.swiglu_limit))
    else:
        act = getattr(cfg, "hidden_act", "silu")
        if act not in HF_ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported for MoE experts")
        if model_type == "mixtral":
            fields = dict(common, expert_intermediate_size=cfg.intermediate_size, num_experts=cfg.num_local_experts,
                          norm_topk_prob=True, activation=HF_ACTIVATIONS[act])
        elif model_type in ("qwen2_moe", "qwen3_moe"):
            shared = int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0) if model_type == "qwen2_moe" else 0
            fields = dict(common, expert_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
                          norm_topk_prob=bool(cfg.norm_topk_prob), activation=HF_ACTIVATIONS[act],
                          shared_expert_intermediate_size=shared, shared_expert_gate=bool(shared))
        else:
            raise ConfigError(f"{source}: model_type {model_type!r} has no MoE mapping "
                              "(supported: mixtral, qwen2_moe, qwen3_moe, gpt_oss)")
    fields.update(overrides)
    return MoEConfig(**fields)


HF_WEIGHT_STYLE = {"mixtral": "mixtral", "qwen2_moe": "qwen_moe", "qwen3_moe": "qwen_moe", "gpt_oss": "gpt_oss"}
