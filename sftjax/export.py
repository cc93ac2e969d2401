"""``sftjax export RUN_OR_CHECKPOINT OUT --format hf|peft|gguf``: a training checkpoint -> a model others can load.

Design in plain words
---------------------
A training checkpoint holds only what trains (the LoRA adapters, or every parameter for full fine-tuning) plus the
run config. Export rebuilds the model the way training did -- base weights from ``model.path``, adapters attached
per the ``lora`` section -- restores the checkpoint's ``params`` item into it and writes one of:

* ``hf``: merged weights (``kernel + scale * A @ B`` in the base dtype) through :func:`sftjax.save_model`, with
  ``config.json``, ``generation_config.json`` and the tokenizer (its chat template included);
* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads
  onto the base model. PEFT names a module by its Hugging Face path (``model.layers.0.self_attn.q_proj``), found
  through the family's weight table, and stores ``lora_A`` as [r, in] and ``lora_B`` as [out, r] (the transposes
  of our [in, r] / [r, out]);
* ``gguf``: one ``.gguf`` file through :func:`sftjax.models.gguf_io.write_gguf` (f16 / bf16 / q8_0).

Every export is written into a temporary sibling and renamed into place at the end, so a failed export never
leaves half a model, and ``--overwrite`` replaces an existing output only once the new one is complete. A non-empty
output is refused without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

from sftjax.errors import CheckpointError, ConfigError
from sftjax.sharding import to_host, writes_files

FORMATS = ("hf", "peft", "gguf")
HF_DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
             "float16": "float16", "f16": "float16", "fp16": "float16"}
GGUF_DTYPES = {"f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16", "bf16": "bf16", "bfloat16": "bf16",
               "q8_0": "q8_0"}
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


# ------------------------------------------------------------------------------------------------ output handling


def _check_output(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            return
        if not overwrite:
            what = "file" if out.is_file() else f"non-empty directory ({sum(1 for _ in out.iterdir())} entries)"
            raise CheckpointError(f"export output {out} is a {what}; pass --overwrite to replace it")


def _publish(staged: pathlib.Path, out: pathlib.Path) -> None:
    """Move the finished export into place, replacing the old output only now."""
    if out.exists():
        backup = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, backup)
        os.replace(staged, out)
        if backup.is_dir():
            shutil.rmtree(backup)
        else:
            backup.unlink()
    else:
        os.replace(staged, out)


# ------------------------------------------------------------------------------------------------ PEFT adapters


def hf_module_parts(model_config) -> dict[str, tuple[str, int | None, int | None, int | None]]:
    """Our Linear module path (``layers.0.attn.q_proj``) -> (its Hugging Face module, first row, end row, rows of
    the fused HF weight); the rows are None for an unfused weight. Phi-3 stores q/k/v as one ``qkv_proj``."""
    from sftjax.models.registry import family_for_config

    parts = {}
    for spec in family_for_config(model_config).weight_specs(model_config):
        if not (spec.transpose and spec.hf_name.endswith(".weight")):
            continue
        hf_module = spec.hf_name[: -len(".weight")]
        total = max(stop for _, _, stop in spec.targets) if spec.targets[0][1] is not None else None
        for path, start, stop in spec.targets:
            if path.endswith(".kernel"):
                parts[path[: -len(".kernel")]] = (hf_module, start, stop, total)
    return parts


def hf_module_names(model_config) -> dict[str, str]:
    """Our Linear module path -> the Hugging Face module holding its weight."""
    return {path: hf for path, (hf, _, _, _) in hf_module_parts(model_config).items()}


def lora_adapters(model, model_config) -> dict[str, tuple[Any, Any, float]]:
    """HF module name -> (A [in, R], B [R, out], scale) of every adapter in ``model``.

    A fused HF module (Phi-3 ``qkv_proj``) gets one adapter of rank R = the sum of its parts' ranks: A stacks the
    parts' A's, B is block-diagonal with each part's B in its rows, so ``A @ B`` is exactly the parts' updates side
    by side (and zero for a part without adapter).
    """
    import jax.numpy as jnp

    from sftjax.models.scan import unstacked
    from sftjax.train.lora import linear_modules

    model = unstacked(model)  # exported one module per layer

    locations = hf_module_parts(model_config)
    grouped: dict[str, list] = {}
    for path, module in linear_modules(model).items():
        if getattr(module, "lora_a", None) is None:
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


def _target_modules(adapted: list[str], all_linear: list[str]) -> list[str] | str:
    """PEFT's ``target_modules``: the leaf names when they select exactly the adapted modules, else an exact regex."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    selected = [name for name in all_linear if name.rsplit(".", 1)[-1] in leaves]
    if sorted(selected) == sorted(adapted):
        return leaves
    return "(" + "|".join(n.replace(".", r"\.") for n in sorted(adapted)) + ")"


def write_peft_adapter(model, model_config, out_dir, *, lora: Mapping, base_model_name_or_path: str,
                       dtype: str | None = None) -> pathlib.Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for the adapters of ``model`` (with several
    processes, every process calls this; process 0 writes)."""
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file

    adapters = lora_adapters(model, model_config)
    if not adapters:
        raise CheckpointError("the checkpoint has no LoRA adapters (full fine-tuning?); use --format hf")
    rank = int(lora["r"])
    rslora = bool(lora.get("rslora", False))
    scales = {round(scale, 6) for _, _, scale in adapters.values()}
    if len(scales) != 1:
        raise CheckpointError(f"LoRA adapters have different scales {sorted(scales)}; PEFT needs one lora_alpha")
    scale = next(iter(adapters.values()))[2]

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
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": _target_modules(list(adapters), all_linear),
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


# ------------------------------------------------------------------------------------------------ from a checkpoint


def model_from_checkpoint(source, *, step: int | None = None):
    """Rebuild the trained model from a run / checkpoint path: (model, model_config, run_config dict, meta)."""
    from flax import nnx

    from sftjax import checkpoint as ckpt
    from sftjax.config import LoraSection
    from sftjax.train.lora import apply_lora, trainable_filter

    root, found_step = ckpt.resolve_checkpoint(source)
    manager = ckpt.CheckpointManager(root, read_only=True, keep=None)
    try:
        step = step if step is not None else (found_step if found_step is not None else manager.latest_step)
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {root}")
        meta = manager.read_meta(step)
        run_config = meta.get("config") or {}
        lora = LoraSection(**(run_config.get("lora") or {}))
        model, model_config = _base_model(run_config, lora, meta, root / str(step))
        if lora.enabled:
            apply_lora(model, lora, rngs=nnx.Rngs(0))
        scanned = bool((run_config.get("model") or {}).get("scan_layers"))
        if scanned:  # the checkpoint holds the stacked layout the run trained in
            from sftjax.models.scan import stack_layers

            stack_layers(model)
        trainable = nnx.state(model, trainable_filter(lora, scan_plan=getattr(model, "scan_plan", None)))
        restored = manager.restore(step, {"params": ckpt.abstract_like(trainable)}, check_config=False)
        nnx.update(model, restored.state["params"])
        if scanned:
            from sftjax.models.scan import unstacked

            model = unstacked(model)
    finally:
        manager.close()
    return model, model_config, run_config, meta


def _base_model(run_config: Mapping, lora, meta: Mapping, step_dir: pathlib.Path):
    import jax.numpy as jnp

    from sftjax import checkpoint as ckpt
    from sftjax.models.loading import load_model

    model_section = run_config.get("model") or {}
    dtype = jnp.dtype(model_section.get("param_dtype") or "float32")
    base_ref = meta.get("base_model") or {}
    path = base_ref.get("path") or model_section.get("path")
    if path:
        fingerprint = base_ref.get("fingerprint")
        if fingerprint and pathlib.Path(path).exists() and ckpt.fingerprint_model(path) != fingerprint:
            raise CheckpointError(f"base model {path} changed since checkpoint {step_dir} was written "
                                  "(fingerprint differs); the adapters would be applied to other weights")
        return load_model(path, dtype=dtype)
    if model_section.get("init"):
        if lora.enabled:
            raise CheckpointError(f"checkpoint {step_dir} holds LoRA adapters of a randomly initialized base "
                                  "(model.init); its frozen weights are not in the checkpoint")
        from flax import nnx

        from sftjax.models.config import ModelConfig
        from sftjax.models.decoder import Decoder

        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in model_section["init"].items()}
        if "vocab_size" not in fields:  # training took it from the tokenizer
            tokenizer = _tokenizer_for(run_config)
            if tokenizer is None:
                raise CheckpointError(f"checkpoint {step_dir}: model.init has no vocab_size and the run's tokenizer "
                                      "cannot be loaded to infer it")
            fields["vocab_size"] = len(tokenizer)
        config = ModelConfig(**{**fields, "dtype": dtype.name, "param_dtype": dtype.name})
        return Decoder(config, rngs=nnx.Rngs(0)), config  # every parameter is restored from the checkpoint
    raise CheckpointError(f"checkpoint {step_dir} config has neither model.path nor model.init")


def _tokenizer_for(run_config: Mapping):
    from sftjax.models.loading import load_tokenizer

    source = (run_config.get("tokenizer") or {}).get("path") or (run_config.get("model") or {}).get("path")
    if not source:
        return None
    try:
        return load_tokenizer(source)
    except CheckpointError:
        return None


def export(source, out, *, format: str, dtype: str | None = None, overwrite: bool = False,
           step: int | None = None) -> pathlib.Path:
    """Export a run / checkpoint to ``out`` in ``format``; returns the written path."""
    if format not in FORMATS:
        raise ConfigError(f"export --format={format!r} is not one of {', '.join(FORMATS)}")
    table = GGUF_DTYPES if format == "gguf" else HF_DTYPES
    if dtype is not None and dtype not in table:
        raise ConfigError(f"export --dtype={dtype!r} for {format} must be one of {', '.join(sorted(table))}")
    out = pathlib.Path(out)
    if format == "gguf" and out.suffix.lower() != ".gguf":
        out = out / "model.gguf"
    _check_output(out, overwrite)
    if _is_model_file_or_dir(source):  # an already exported / downloaded model: convert its format
        if format == "peft":
            raise CheckpointError(f"{source} is a plain model without LoRA adapters; --format peft needs a "
                                  "training checkpoint of a LoRA run")
        from sftjax.models.loading import load_model

        model, model_config = load_model(source)
        run_config, meta = {"model": {"path": str(source)}}, {}
    else:
        model, model_config, run_config, meta = model_from_checkpoint(source, step=step)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if format == "hf":
            from sftjax.models.loading import save_model

            save_model(model, model_config, staged, dtype=HF_DTYPES[dtype] if dtype else None,
                       tokenizer=_tokenizer_for(run_config))
        elif format == "peft":
            base = (meta.get("base_model") or {}).get("path") or (run_config.get("model") or {}).get("path") or ""
            write_peft_adapter(model, model_config, staged, lora=run_config.get("lora") or {},
                               base_model_name_or_path=str(base), dtype=HF_DTYPES[dtype] if dtype else None)
        else:
            staged = _write_gguf(model, model_config, run_config, staged, GGUF_DTYPES[dtype or "f16"])
        _publish(staged, out)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True) if staged.is_dir() else staged.unlink()
    return out


def _is_model_file_or_dir(source) -> bool:
    path = pathlib.Path(source)
    return (path.is_file() and path.suffix.lower() == ".gguf") or (path / "config.json").is_file()


def _write_gguf(model, model_config, run_config, staged_dir: pathlib.Path, dtype: str) -> pathlib.Path:
    from sftjax.models import gguf_io

    write_gguf = getattr(gguf_io, "write_gguf", None)
    if write_gguf is None:
        raise CheckpointError("GGUF export is not available in this version of sftjax (no gguf_io.write_gguf)")
    target = staged_dir.with_suffix(".gguf")
    write_gguf(model, model_config, _tokenizer_for(run_config), target, dtype=dtype)
    shutil.rmtree(staged_dir, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory, its checkpoints/ directory, one step directory, or a HF "
                             "model directory / .gguf file to convert")
    parser.add_argument("out", metavar="OUT", help="output directory (hf, peft) or .gguf file (gguf)")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: merged safetensors; peft: LoRA adapter for peft; gguf: llama.cpp file")
    parser.add_argument("--dtype", default=None,
                        help="hf/peft: float32|bfloat16|float16 (default: the model's); gguf: f16|bf16|q8_0|f32")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def run(args: argparse.Namespace) -> int:
    written = export(args.source, args.out, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                     step=args.step)
    print(f"exported {args.format} to {written}")
    return 0
