"""Checkpoints in and out: ``load_model``, ``build_model``, ``save_model``, ``load_tokenizer``.

Loading builds the model abstractly (``nnx.eval_shape``: shapes only, no memory), then fills each parameter as
its tensor is read, cast to the target dtype and placed directly in its sharding. Peak host memory is the model
in the target dtype plus one tensor. Every HF tensor must map to a parameter of the right shape and every
parameter must be filled; otherwise a one-line CheckpointError names the tensor and the source.
"""

from __future__ import annotations

import importlib
import json
import pathlib
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftjax.errors import CheckpointError
from sftjax.models import hf_io
from sftjax.models.config import ModelConfig
from sftjax.models.decoder import Decoder
from sftjax.models.layers import Linear
from sftjax.models.registry import family_for_config, family_for_hf
from sftjax.sharding import to_host, writes_files

# Tensors some checkpoints carry that the model recomputes or does not need.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == name:
            return None
        raise


def _resolve(path_or_alias) -> pathlib.Path:
    zoo = _optional_module("sftjax.models.zoo")
    if zoo is not None:
        return pathlib.Path(zoo.resolve_model_path(path_or_alias))
    return pathlib.Path(path_or_alias)


def _variables_by_path(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable)}


def _expected_hf_shape(spec, variables) -> tuple[int, ...]:
    shapes = [variables[path].get_value().shape for path, _, _ in spec.targets]
    if spec.transpose:
        return (sum(shape[1] for shape in shapes), shapes[0][0])
    return shapes[0]


def build_model(hf_config: dict, tensors: Iterable[tuple[str, np.ndarray]], *, dtype=jnp.float32, mesh=None,
                source: str = "checkpoint") -> tuple[Decoder, ModelConfig]:
    """Build a Decoder from a config.json dict and HF-named tensors ([out, in] linear layouts), streamed."""
    family = family_for_hf(hf_config, source=source)
    dtype_name = jnp.dtype(dtype).name
    config = family.config_from_hf(hf_config, source=source).replace(dtype=dtype_name, param_dtype=dtype_name)
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    variables = _variables_by_path(model)
    specs = {spec.hf_name: spec for spec in family.weight_specs(config)}
    target_dtype = np.dtype(jnp.dtype(dtype))
    seen: set[str] = set()
    if mesh is not None:
        from sftjax.sharding import variable_sharding

    for name, array in tensors:
        spec = specs.get(name)
        if spec is None:
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            raise CheckpointError(f"{source}: unexpected tensor {name} for {config.architecture} "
                                  f"(wrong architecture in config.json?)")
        if name in seen:
            raise CheckpointError(f"{source}: tensor {name} appears twice")
        seen.add(name)
        expected = _expected_hf_shape(spec, variables)
        if tuple(array.shape) != tuple(expected):
            raise CheckpointError(f"{source}: tensor {name} has shape {list(array.shape)} but config.json implies "
                                  f"{list(expected)}")
        for path, start, stop in spec.targets:
            part = array if start is None else array[start:stop]
            if spec.transpose:
                part = part.T
            part = np.ascontiguousarray(part.astype(target_dtype, copy=False))
            variable = variables[path]
            if mesh is None:
                variable.set_value(jnp.asarray(part))
            else:  # each device (of this host) receives only its slice; works across hosts too
                variable.set_value(jax.make_array_from_callback(
                    part.shape, variable_sharding(variable, mesh), lambda index, part=part: part[index]))
        del array
    missing = [name for name in specs if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]}{more} required by config.json")
    return model, config


def load_model(path_or_alias, *, dtype=jnp.float32, mesh=None) -> tuple[Decoder, ModelConfig]:
    """Load a HF checkpoint directory or a .gguf file (or a zoo alias) into a Decoder of ``dtype``."""
    path = _resolve(path_or_alias)
    if path.is_file() and path.suffix.lower() == ".gguf":
        gguf_io = importlib.import_module("sftjax.models.gguf_io")
        hf_config, tensors = gguf_io.read_gguf_checkpoint(path)
        return build_model(hf_config, tensors, dtype=dtype, mesh=mesh, source=str(path))
    hf_config = hf_io.read_config_json(path)
    family_for_hf(hf_config, source=str(path / "config.json"))  # fail on the architecture before reading weights
    hf_io.safetensors_files(path)  # fail on a missing shard before any work
    return build_model(hf_config, hf_io.iter_safetensors(path), dtype=dtype, mesh=mesh, source=str(path))


def _module_at(model: nnx.Module, dotted: str):
    node = model
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _parameter_value(model: nnx.Module, path: str):
    """The array to export for a parameter path; Linear kernels include their merged LoRA adapter."""
    module_path, _, attribute = path.rpartition(".")
    module = _module_at(model, module_path)
    if isinstance(module, Linear) and attribute == "kernel":
        return module.merged_kernel()
    return getattr(module, attribute).get_value()


def _hf_tensor_entries(model: Decoder, config: ModelConfig, target: np.dtype):
    """(HF name, nbytes, produce) per checkpoint tensor; ``produce`` gathers one tensor to host when called."""
    from sftjax.models.scan import unstacked

    model = unstacked(model)  # a scanned model is exported/run one module per layer
    entries = []
    for spec in family_for_config(config).weight_specs(config):
        paths = [path for path, _, _ in spec.targets]
        shapes = [_parameter_value(model, p).shape for p in paths]
        shape = (sum(s[1] for s in shapes), shapes[0][0]) if spec.transpose else shapes[0]

        def produce(paths=paths, transpose=spec.transpose):
            parts = [to_host(_parameter_value(model, p).astype(target)) for p in paths]
            if transpose:
                parts = [part.T for part in parts]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

        entries.append((spec.hf_name, int(np.prod(shape)) * target.itemsize, produce))
    return entries


def iter_hf_tensors(model: Decoder, config: ModelConfig, *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """The model as HF-named tensors ([out, in] linear layouts, LoRA merged), one at a time (for exporters)."""
    target = np.dtype(jnp.dtype(dtype if dtype is not None else config.param_dtype))
    for name, _, produce in _hf_tensor_entries(model, config, target):
        yield name, produce()


def save_model(model: Decoder, config: ModelConfig, out_dir, *, dtype=None, tokenizer=None,
               max_shard_bytes: int = 5 * 10**9) -> pathlib.Path:
    """Write a HF directory (safetensors shards + index, config.json, generation_config.json, tokenizer files)
    that ``transformers.AutoModelForCausalLM.from_pretrained`` loads. ``dtype`` defaults to the model's.
    Existing ``model*.safetensors`` files and index in ``out_dir`` are replaced; nothing else is touched.
    With several processes every process calls this (the tensors are gathered collectively); process 0 writes."""
    out_dir = pathlib.Path(out_dir)
    target = np.dtype(jnp.dtype(dtype if dtype is not None else config.param_dtype))
    entries = _hf_tensor_entries(model, config, target)
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


def load_tokenizer(path_or_alias):
    """A transformers tokenizer from a checkpoint directory, or from a .gguf file's embedded vocabulary."""
    path = _resolve(path_or_alias)
    if path.is_file() and path.suffix.lower() == ".gguf":
        gguf_io = importlib.import_module("sftjax.models.gguf_io")
        return gguf_io.load_gguf_tokenizer(path)
    if not path.exists():
        raise CheckpointError(f"{path}: tokenizer path does not exist")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises many types for unusable tokenizer files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot load a tokenizer ({message})") from None
