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
  of our [in, r] / [r, out]). Per-expert LoRA on the stacked MoE experts becomes peft's ``target_parameters``
  on transformers' fused expert tensors (:mod:`sftjax.peft.expert_adapters`); for a family without that layout
  the export says so in one log line and writes the merged model (``hf``) instead;
* ``gguf``: one ``.gguf`` file through :func:`sftjax.models.gguf_write.write_gguf` (f16 / bf16 / q8_0).

Every export is written into a temporary sibling and renamed into place at the end, so a failed export never
leaves half a model, and ``--overwrite`` replaces an existing output only once the new one is complete. A non-empty
output is refused without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Mapping

from flax import nnx

from sftjax.errors import CheckpointError, ConfigError
from sftjax.models.gguf_write import check_exportable, write_gguf
from sftjax.models.loading import load_model, save_model
from sftjax.models.scan import unstacked
from sftjax.models.tokenizer import load_tokenizer
from sftjax.peft.lora import trainable_filter
from sftjax.train import checkpoint as ckpt
from sftjax.train import run_meta
from sftjax.train import program
from sftjax.peft.adapter_io import expert_adapter_paths, lora_adapters, write_peft_adapter
from sftjax.peft.expert_adapters import FUSED_FAMILIES
from sftjax.peft.init import RESIDUAL_INITS

log = logging.getLogger(__name__)

FORMATS = ("hf", "peft", "gguf")
HF_DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
             "float16": "float16", "f16": "float16", "fp16": "float16"}
GGUF_DTYPES = {"f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16", "bf16": "bf16", "bfloat16": "bf16",
               "q8_0": "q8_0"}


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


# ------------------------------------------------------------------------------------------------ from a checkpoint


def model_from_checkpoint(source, *, step: int | None = None, with_initial: bool = False):
    """Rebuild the trained model from a run / checkpoint path: (model, model_config, run_config dict, meta), plus
    with ``with_initial`` the adapters as initialized (``adapter_io.lora_adapters``; None unless ``lora.init``
    rewrote the base: PiSSA/OLoRA, whose PEFT export needs them).

    The model is built by the run recipe (:mod:`sftjax.train.program`) from the config saved in the checkpoint --
    base weights from ``model.path`` (refused when they changed since training) or a random init whose every
    parameter the checkpoint then holds -- adapted the same way, and the checkpoint's ``params`` restored into it.
    """
    root, found_step = ckpt.resolve_checkpoint(source)
    manager = ckpt.CheckpointManager(root, read_only=True, keep=None)
    try:
        step = step if step is not None else (found_step if found_step is not None else manager.latest_step)
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {root}")
        meta = manager.read_meta(step)
        cfg = run_meta.run_config(meta, root / str(step))
        model, model_config = _base_model(cfg, meta, root / str(step))
        program.adapt(model, cfg)
        initial = (lora_adapters(model, model_config) if cfg.lora.enabled and cfg.lora.init in RESIDUAL_INITS
                   else None)  # the init is deterministic (SVD / QR of the base): the run's own initial adapters
        trainable = nnx.state(model, trainable_filter(cfg.lora, scan_plan=model.scan_plan))
        restored = manager.restore(step, {"params": ckpt.abstract_like(trainable)}, check_config=False)
        nnx.update(model, restored.state["params"])
        model = unstacked(model)  # exported one module per layer
    finally:
        manager.close()
    if with_initial:
        return model, model_config, cfg.to_dict(), meta, initial
    return model, model_config, cfg.to_dict(), meta


def _base_model(cfg, meta: Mapping, step_dir: pathlib.Path):
    base_ref = meta.get("base_model") or {}
    path = base_ref.get("path") or cfg.model.path
    if path:
        fingerprint = base_ref.get("fingerprint")
        if fingerprint and pathlib.Path(path).exists() and run_meta.fingerprint_model(path) != fingerprint:
            raise CheckpointError(f"base model {path} changed since checkpoint {step_dir} was written "
                                  "(fingerprint differs); the adapters would be applied to other weights")
        return program.build_model(cfg.replace(model=dataclasses.replace(cfg.model, path=str(path))))
    if cfg.lora.enabled:
        raise CheckpointError(f"checkpoint {step_dir} holds LoRA adapters of a randomly initialized base "
                              "(model.init); its frozen weights are not in the checkpoint")
    tokenizer = None
    if "vocab_size" not in (cfg.model.init or {}):  # training took it from the tokenizer
        tokenizer = _tokenizer_for(cfg.to_dict())
        if tokenizer is None:
            raise CheckpointError(f"checkpoint {step_dir}: model.init has no vocab_size and the run's tokenizer "
                                  "cannot be loaded to infer it")
    return program.build_model(cfg, tokenizer=tokenizer)  # every parameter is restored from the checkpoint


def _tokenizer_for(run_config: Mapping):
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
        model, model_config = load_model(source)
        run_config, meta, initial = {"model": {"path": str(source)}}, {}, None
    else:
        model, model_config, run_config, meta, initial = model_from_checkpoint(source, step=step, with_initial=True)
    if format == "gguf":  # a family llama.cpp cannot run is one line before anything is written
        check_exportable(model_config.to_hf_dict(), where=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if format == "hf":
            save_model(model, model_config, staged, dtype=HF_DTYPES[dtype] if dtype else None,
                       tokenizer=_tokenizer_for(run_config))
        elif (format == "peft" and model_config.family not in FUSED_FAMILIES
              and expert_adapter_paths(unstacked(model))):
            log.warning("%s: per-expert LoRA adapters have no PEFT adapter form here; writing the merged model "
                        "(Hugging Face safetensors) instead", out)
            save_model(model, model_config, staged, dtype=HF_DTYPES[dtype] if dtype else None,
                       tokenizer=_tokenizer_for(run_config))
        elif format == "peft":
            base = (meta.get("base_model") or {}).get("path") or (run_config.get("model") or {}).get("path") or ""
            write_peft_adapter(model, model_config, staged, lora=run_config.get("lora") or {},
                               base_model_name_or_path=str(base), dtype=HF_DTYPES[dtype] if dtype else None,
                               initial_adapters=initial)
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
