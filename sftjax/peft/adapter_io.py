"""The PEFT adapter format: our LoRA adapters <-> ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a module by its Hugging Face path (``model.layers.0.self_attn.q_proj``), found through the family's
weight table, and stores ``lora_A`` as [r, in] and ``lora_B`` as [out, r] (the transposes of our [in, r] /
[r, out]). A fused Hugging Face module (Phi-3 ``qkv_proj``) gets one adapter whose rank is the sum of its parts'
(A stacked, B block-diagonal), so that ``A @ B`` is exactly the parts' updates side by side; a DoRA magnitude is
written as peft's ``lora_magnitude_vector``. Modules trained
whole (``lora.modules_to_save``) are stored under their Hugging Face tensor names, as PEFT does.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from sftjax.errors import CheckpointError
from sftjax.sharding import to_host, writes_files

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def hf_module_parts(model_config) -> dict[str, tuple[str, int | None, int | None, int | None]]:
    """Our Linear module path (``layers.0.attn.q_proj``) -> (its Hugging Face module, first row, end row, rows of
    the fused HF weight); the rows are None for an unfused weight. Phi-3 stores q/k/v as one ``qkv_proj``."""
    from sftjax.models.registry import family_for_config

    parts = {}
    for spec in family_for_config(model_config).weight_specs(model_config):
        if not (spec.transpose and spec.hf_name.endswith(".weight")) or getattr(spec, "expert", None) is not None:
            continue  # a per-expert tensor is one slot of a stacked parameter, not a module of its own
        hf_module = spec.hf_name[: -len(".weight")]
        total = max(stop for _, _, stop in spec.targets) if spec.targets[0][1] is not None else None
        for path, start, stop in spec.targets:
            if path.endswith(".kernel"):
                parts[path[: -len(".kernel")]] = (hf_module, start, stop, total)
    return parts


def hf_module_names(model_config) -> dict[str, str]:
    """Our Linear module path -> the Hugging Face module holding its weight."""
    return {path: hf for path, (hf, _, _, _) in hf_module_parts(model_config).items()}


def expert_adapter_paths(model) -> list[str]:
    """The stacked MoE expert projections of ``model`` that carry LoRA adapters."""
    from sftjax.models.moe import ExpertLinear
    from sftjax.peft.lora import linear_modules

    return [path for path, module in linear_modules(model).items()
            if isinstance(module, ExpertLinear) and module.lora_a is not None]


def lora_adapters(model, model_config, *, skip_experts: bool = False) -> dict[str, tuple[Any, Any, float]]:
    """HF module name -> (A [in, R], B [R, out], scale) of every adapter in ``model`` (``skip_experts``: leave the
    per-expert adapters out, else they are a one-line CheckpointError; see :mod:`sftjax.peft.expert_adapters`).

    A fused HF module (Phi-3 ``qkv_proj``) gets one adapter of rank R = the sum of its parts' ranks: A stacks the
    parts' A's, B is block-diagonal with each part's B in its rows, so ``A @ B`` is exactly the parts' updates side
    by side (and zero for a part without adapter).
    """
    import jax.numpy as jnp

    from sftjax.models.scan import unstacked
    from sftjax.peft.lora import linear_modules

    model = unstacked(model)  # exported one module per layer

    locations = hf_module_parts(model_config)
    grouped: dict[str, list] = {}
    experts = expert_adapter_paths(model)
    if experts and not skip_experts:
        raise CheckpointError(f"per-expert LoRA adapters ({experts[0]} and {len(experts) - 1} more) have no PEFT "
                              f"adapter form for {model_config.architecture} here; export --format hf (merged)")
    for path, module in linear_modules(model).items():
        if getattr(module, "lora_a", None) is None or path in experts:
            continue
        if path not in locations:
            raise CheckpointError(f"LoRA adapter on {path} has no Hugging Face module in "
                                  f"{model_config.architecture} checkpoints; export --format hf instead")
        hf_module, start, stop, total = locations[path]
        grouped.setdefault(hf_module, []).append(
            (module.lora_a[...], module.lora_b[...], float(module.lora_scale), start, stop, total))
    adapters = {}
    for hf_module, parts in grouped.items():
        if parts[0][3] is None:
            a_IR, b_RO, scale = parts[0][:3]
            adapters[hf_module] = (a_IR, b_RO, scale)
            continue
        scale = parts[0][2]
        if any(abs(p[2] - scale) > 1e-9 * abs(scale) for p in parts):
            raise CheckpointError(f"LoRA parts of the fused {hf_module} have different scales")
        total = parts[0][5]
        a_IR = jnp.concatenate([p[0] for p in parts], axis=1)
        b_RO = jnp.zeros((a_IR.shape[1], total), parts[0][1].dtype)
        offset = 0
        for _, b_part, _, start, stop, _ in parts:
            b_RO = b_RO.at[offset: offset + b_part.shape[0], start:stop].set(b_part)
            offset += b_part.shape[0]
        adapters[hf_module] = (a_IR, b_RO, scale)
    return adapters


def dora_magnitudes(model, model_config) -> dict[str, Any]:
    """HF module name -> DoRA magnitude [out] (peft's ``lora_magnitude_vector``) of every DoRA adapter in ``model``.

    A fused HF module (Phi-3 ``qkv_proj``) gets its parts' magnitudes side by side: the norm is per output row,
    and each row of the fused ``W + scale * B A`` is its part's (B is block-diagonal), so peft computes the same
    numbers. Every part of such a module then needs a DoRA adapter (one-line CheckpointError otherwise)."""
    import jax.numpy as jnp

    from sftjax.models.scan import unstacked
    from sftjax.peft.lora import linear_modules

    model = unstacked(model)
    locations = hf_module_parts(model_config)
    grouped: dict[str, list] = {}
    for path, module in linear_modules(model).items():
        if getattr(module, "lora_magnitude", None) is None or path not in locations:
            continue
        hf_module, start, _, total = locations[path]
        grouped.setdefault(hf_module, []).append((start or 0, module.lora_magnitude[...], total, path))
    magnitudes = {}
    for hf_module, parts in grouped.items():
        parts.sort(key=lambda p: p[0])
        total = parts[0][2]
        if total is not None and sum(int(p[1].shape[0]) for p in parts) != total:
            other = min(p for p, (hf, _, _, _) in locations.items() if hf == hf_module and
                        p not in {q[3] for q in parts})
            raise CheckpointError(f"DoRA on part of the fused {hf_module}: {other} has no DoRA adapter; "
                                  "target all of its parts or export --format hf")
        magnitudes[hf_module] = jnp.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return magnitudes


def _target_modules(adapted: list[str], all_linear: list[str]) -> list[str] | str:
    """PEFT's ``target_modules``: the leaf names when they select exactly the adapted modules, else an exact regex."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    selected = [name for name in all_linear if name.rsplit(".", 1)[-1] in leaves]
    if sorted(selected) == sorted(adapted):
        return leaves
    return "(" + "|".join(n.replace(".", r"\.") for n in sorted(adapted)) + ")"


def with_initial_adapters(adapters: Mapping, initial: Mapping) -> dict:
    """A PiSSA/OLoRA run's adapters as a plain LoRA adapter of the **original** base, as peft converts them
    (``save_pretrained(path_initial_model_for_weight_conversion=...)``): the run trains ``A, B`` on the residual
    ``W - scale * A0 @ B0``, which is ``W + scale * (A @ B - A0 @ B0)`` = ``W + scale * [A, A0] @ [B; -B0]``: an
    adapter of twice the rank and the same scale. ``initial``: :func:`lora_adapters` right after the init."""
    import jax.numpy as jnp

    out = {}
    for name, (a_IR, b_RO, scale) in adapters.items():
        if name not in initial:
            raise CheckpointError(f"{name}: no initial adapter to convert the residual-initialized run against")
        a0_IR, b0_RO, _ = initial[name]
        out[name] = (jnp.concatenate([a_IR, a0_IR.astype(a_IR.dtype)], axis=1),
                     jnp.concatenate([b_RO, -b0_RO.astype(b_RO.dtype)], axis=0), scale)
    return out


def write_peft_adapter(model, model_config, out_dir, *, lora: Mapping, base_model_name_or_path: str,
                       dtype: str | None = None, initial_adapters: Mapping | None = None) -> pathlib.Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for the adapters of ``model`` (with several
    processes, every process calls this; process 0 writes). A run whose ``lora.init`` rewrote the base (PiSSA,
    OLoRA) needs ``initial_adapters`` (:func:`lora_adapters` of the model right after its init): the adapter is
    then written for the original base (see :func:`with_initial_adapters`), which is what peft loads it onto."""
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file

    from sftjax.peft.expert_adapters import expert_peft_tensors

    adapters = lora_adapters(model, model_config, skip_experts=True)
    experts = expert_peft_tensors(model, model_config)  # None: no adapter on any expert
    if not adapters and experts is None:
        raise CheckpointError("the checkpoint has no LoRA adapters (full fine-tuning?); use --format hf")
    rank = int(lora["r"])
    if lora.get("init", "default") in ("pissa", "olora"):
        if initial_adapters is None:
            raise CheckpointError(f"lora.init={lora['init']}: the adapter of a run that rewrote the base weights "
                                  "needs its initial adapters to be written for the original base")
        if dora_magnitudes(model, model_config):
            raise CheckpointError(f"lora.init={lora['init']} with DoRA cannot be written as a PEFT adapter of the "
                                  "original base (the magnitude is of the residual); use --format hf")
        adapters, rank = with_initial_adapters(adapters, initial_adapters), 2 * rank
    if experts is not None:
        # peft's rank_pattern does not reach target_parameters: expert adapters set the global rank, and the other
        # modules get theirs through rank_pattern
        rank = experts.rank
    rslora = bool(lora.get("rslora", False))
    scales = {round(scale, 6) for _, _, scale in adapters.values()} | (
        {round(experts.scale, 6)} if experts is not None else set())
    if len(scales) != 1:
        raise CheckpointError(f"LoRA adapters have different scales {sorted(scales)}; PEFT needs one lora_alpha")
    scale = next(iter(adapters.values()))[2] if adapters else experts.scale

    def alpha_for(r: int) -> float:  # PEFT's scale is alpha / r (alpha / sqrt(r) with rsLoRA)
        return scale * (r ** 0.5 if rslora else r)

    rank_pattern, alpha_pattern = {}, {}
    tensors = {}
    for name, (a_IR, b_RO, _) in adapters.items():
        if a_IR.shape[1] != rank:  # a fused module: its rank is the sum of its parts'
            pattern = name.replace(".", r"\.")
            rank_pattern[pattern] = int(a_IR.shape[1])
            alpha_pattern[pattern] = alpha_for(int(a_IR.shape[1]))
        target = np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(a_IR.dtype)
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(to_host(a_IR.astype(target)).T)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(to_host(b_RO.astype(target)).T)
    if experts is not None:  # PEFT's target_parameters on transformers' fused expert tensors
        for name, value in experts.tensors.items():
            target = np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(value.dtype)
            tensors[f"base_model.model.{name}"] = np.ascontiguousarray(value.astype(target))
    magnitudes = dora_magnitudes(model, model_config)
    if magnitudes and set(magnitudes) != set(adapters):
        missing = sorted(set(adapters) - set(magnitudes))[0]
        raise CheckpointError(f"{missing} has a LoRA adapter without DoRA while others have DoRA; peft's use_dora "
                              "applies to every module: export --format hf")
    for name, magnitude in magnitudes.items():
        target = np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(magnitude.dtype)
        tensors[f"base_model.model.{name}.lora_magnitude_vector"] = np.ascontiguousarray(
            to_host(magnitude.astype(target)))
    saved_modules, saved_tensors = modules_to_save_tensors(model, model_config, lora.get("modules_to_save") or [],
                                                           set(adapters), dtype)
    tensors.update({f"base_model.model.{name}": value for name, value in saved_tensors.items()})
    out_dir = pathlib.Path(out_dir)
    if not writes_files():  # several processes: all gathered the tensors above, process 0 writes
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    all_linear = sorted(set(hf_module_names(model_config).values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha_for(rank),
        "use_rslora": rslora,
        "use_dora": bool(magnitudes),
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": _target_modules(list(adapters), all_linear) if adapters else [],
        "target_parameters": experts.target_parameters if experts is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": saved_modules or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def modules_to_save_tensors(model, model_config, patterns: list[str], adapted: set[str], dtype: str | None = None):
    """(HF module names, {HF tensor name: array}) of the fully trained modules (``lora.modules_to_save``).

    PEFT stores such a module whole, under its HF tensor names, and swaps it in on load; a parameter matched by a
    pattern brings its whole HF module (weight and bias) along.
    """
    import re

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sftjax.models.scan import unstacked

    model = unstacked(model)  # exported one module per layer

    from sftjax.models.registry import family_for_config

    if not patterns:
        return [], {}
    param_paths = [".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    chosen = {p for p in param_paths if any(re.search(pattern, p.replace(".", "/")) for pattern in patterns)}
    specs = family_for_config(model_config).weight_specs(model_config)
    modules = sorted({spec.hf_name.rsplit(".", 1)[0] for spec in specs
                      if any(path in chosen for path, _, _ in spec.targets)})
    if model_config.tie_word_embeddings and any(m.endswith("embed_tokens") for m in modules):
        raise CheckpointError("lora.modules_to_save with tied embeddings cannot be written as a PEFT adapter; "
                              "use --format hf")
    clash = sorted(set(modules) & adapted)
    if clash:
        raise CheckpointError(f"{clash[0]} has both a LoRA adapter and lora.modules_to_save; use --format hf")
    tensors = {}
    for spec in specs:
        if spec.hf_name.rsplit(".", 1)[0] not in modules:
            continue
        parts = []
        for path, _, _ in spec.targets:
            node = model
            for key in path.split("."):
                node = node[int(key)] if key.isdigit() else getattr(node, key)
            value = node[...]
            value = value.astype(jnp.dtype(dtype)) if dtype else value
            parts.append(to_host(value).T if spec.transpose else to_host(value))
        tensors[spec.hf_name] = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
    return modules, tensors
