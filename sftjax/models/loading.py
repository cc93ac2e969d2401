"""Checkpoints in and out: ``load_model``, ``save_model``, ``load_tokenizer``.

A path is a Hugging Face directory (sharded safetensors), a ``.gguf`` file or an alias of ``sftjax.models.zoo``.
The tensors stream through :func:`sftjax.models.weights.model_from_hf_tensors` (shapes first, then one tensor
at a time into its sharding), so no full host copy of the model is ever made.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np

from sftjax.errors import CheckpointError, ConfigError
from sftjax.models import gguf_read, hf_io
from sftjax.models.config import ModelConfig
from sftjax.models.decoder import Decoder
from sftjax.models.registry import family_for_hf
from sftjax.models.weights import hf_tensor_entries, model_from_hf_tensors
from sftjax.models.zoo import resolve_model_path
from sftjax.sharding import writes_files


def load_model(path_or_alias, *, dtype=jnp.float32, mesh=None, quantize: str = "none",
               double_quant: bool = False) -> tuple[Decoder, ModelConfig]:
    """Load a HF checkpoint directory or a .gguf file (or a zoo alias) into a Decoder of ``dtype``.

    ``quantize="nf4" | "int8"`` then quantizes its attention and MLP linears in place (bitsandbytes' formats,
    :func:`sftjax.peft.quant.quantize_model`; ``double_quant`` for nf4), for QLoRA or a smaller frozen model; the
    dense weights are read first. (A run quantizes after its LoRA init instead: see ``sftjax.train.program``.)"""
    if quantize not in ("none", "nf4", "int8"):
        raise ConfigError(f"load_model: quantize={quantize!r} is not one of none, nf4, int8")
    path = resolve_model_path(path_or_alias)
    if path.is_file() and path.suffix.lower() == ".gguf":
        hf_config, tensors = gguf_read.read_gguf_checkpoint(path)
        model, config = model_from_hf_tensors(hf_config, tensors, dtype=dtype, mesh=mesh, source=str(path))
    else:
        hf_config = hf_io.read_config_json(path)
        family_for_hf(hf_config, source=str(path / "config.json"))  # fail on the architecture before reading weights
        hf_io.safetensors_files(path)  # fail on a missing shard before any work
        model, config = model_from_hf_tensors(hf_config, hf_io.iter_safetensors(path), dtype=dtype, mesh=mesh,
                                              source=str(path))
    if quantize != "none":
        from sftjax.peft.quant import quantize_model

        quantize_model(model, quantize, double_quant=double_quant)
        if mesh is not None:
            from sftjax.sharding import shard_model

            shard_model(model, mesh)
    return model, config


def save_model(model: Decoder, config: ModelConfig, out_dir, *, dtype=None, tokenizer=None,
               max_shard_bytes: int = 5 * 10**9) -> pathlib.Path:
    """Write a HF directory (safetensors shards + index, config.json, generation_config.json, tokenizer files)
    that ``transformers.AutoModelForCausalLM.from_pretrained`` loads. ``dtype`` defaults to the model's.
    Existing ``model*.safetensors`` files and index in ``out_dir`` are replaced; nothing else is touched.
    With several processes every process calls this (the tensors are gathered collectively); process 0 writes."""
    out_dir = pathlib.Path(out_dir)
    target = np.dtype(jnp.dtype(dtype if dtype is not None else config.param_dtype))
    entries = hf_tensor_entries(model, config, target)
    if not writes_files():
        for _, _, produce in entries:  # take part in each tensor's gather, in the writer's order
            produce()
        return out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_io.write_safetensors(entries, out_dir, max_shard_bytes=max_shard_bytes)

    hf_config = config.to_hf_dict()
    hf_config["dtype"] = target.name
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    from transformers import GenerationConfig

    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                     pad_token_id=config.pad_token_id).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
