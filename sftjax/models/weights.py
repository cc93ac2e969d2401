"""Our parameter tree <-> Hugging Face tensor names, in both directions, for every reader and writer.

A family's weight table (``family.weight_specs(config)``: HF tensor name -> parameter path(s), transposed or not,
row slices of fused tensors) is the one place that knows the names. ``model_from_hf_tensors`` builds a Decoder
abstractly (``nnx.eval_shape``: shapes only, no memory) and fills each parameter as its tensor streams in, cast to
the target dtype and placed directly in its sharding, so peak host memory is the model plus one tensor; every
tensor must map to a parameter of the right shape and every parameter must be filled, or a one-line
CheckpointError names the tensor and the source. ``iter_hf_tensors`` / ``hf_tensor_entries`` go the other way
for the exporters (LoRA merged, one tensor gathered to the host at a time). The safetensors and GGUF readers and
writers sit above this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftjax.errors import CheckpointError
from sftjax.models.config import ModelConfig
from sftjax.models.decoder import Decoder
from sftjax.models.layers import Linear
from sftjax.models.moe import ExpertLinear
from sftjax.models.registry import family_for_config, family_for_hf
from sftjax.models.scan import unstacked
from sftjax.sharding import to_host, variable_sharding

# Tensors some checkpoints carry that the model recomputes or does not need.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _variables_by_path(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable)}


def _expected_hf_shape(spec, variables) -> tuple[int, ...]:
    shapes = [variables[path].get_value().shape for path, _, _ in spec.targets]
    if spec.expert is not None:  # one slot of a stacked [expert, ...] parameter
        shapes = [shape[1:] for shape in shapes]
    if spec.transpose:
        return (sum(shape[1] for shape in shapes), shapes[0][0])
    return shapes[0]


def model_from_hf_tensors(hf_config: dict, tensors: Iterable[tuple[str, np.ndarray]], *, dtype=jnp.float32, mesh=None,
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
    # stacked expert parameters fill on the host slot by slot (one parameter at a time), then go to the device
    stacked: dict[str, tuple[np.ndarray, set[int]]] = {}
    if hasattr(family, "tensors_from_hf"):  # a family whose files need a conversion first (gpt-oss: MXFP4, fused)
        tensors = family.tensors_from_hf(tensors, config, source=source)

    def place(path, value):
        variable = variables[path]
        if mesh is None:
            variable.set_value(jnp.asarray(value))
        else:  # each device (of this host) receives only its slice; works across hosts too
            variable.set_value(jax.make_array_from_callback(
                value.shape, variable_sharding(variable, mesh), lambda index, value=value: value[index]))

    rename = getattr(family, "checkpoint_tensor_name", None)  # multimodal checkpoints: the text decoder's names
    for name, array in tensors:
        if rename is not None and (name := rename(hf_config, name)) is None:
            continue  # a tensor of another tower (vision, audio)
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
            if spec.expert is None:
                place(path, part)
                continue
            shape = variables[path].get_value().shape
            buffer, filled = stacked.setdefault(path, (np.zeros(shape, target_dtype), set()))
            buffer[spec.expert] = part
            filled.add(spec.expert)
            if len(filled) == shape[0]:
                place(path, buffer)
                del stacked[path]
        del array
    missing = [name for name in specs if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]}{more} required by config.json")
    return model, config


def _module_at(model: nnx.Module, dotted: str):
    node = model
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _parameter_value(model: nnx.Module, path: str):
    """The array to export for a parameter path; Linear kernels include their merged LoRA adapter."""
    module_path, _, attribute = path.rpartition(".")
    module = _module_at(model, module_path)
    if isinstance(module, (Linear, ExpertLinear)) and attribute == "kernel":
        return module.merged_kernel()
    return getattr(module, attribute).get_value()


def _parameter_shape(model: nnx.Module, path: str) -> tuple[int, ...]:
    module_path, _, attribute = path.rpartition(".")
    module = _module_at(model, module_path)
    if isinstance(module, ExpertLinear) and attribute == "kernel":
        return module.kernel_shape  # also when quantized
    return tuple(getattr(module, attribute).get_value().shape)


def hf_tensor_entries(model: Decoder, config: ModelConfig, target: np.dtype):
    """(HF name, nbytes, produce) per checkpoint tensor; ``produce`` gathers one tensor to host when called."""
    model = unstacked(model)  # a scanned model is exported/run one module per layer
    entries = []
    last: dict = {}  # the parameter value of the previous per-expert tensor (its experts come in a row)

    def value_of(path, expert):
        if expert is None:
            return _parameter_value(model, path)
        if last.get("path") != path:
            last.update(path=path, value=_parameter_value(model, path))
        return last["value"][expert]

    for spec in family_for_config(config).weight_specs(config):
        paths = [path for path, _, _ in spec.targets]
        if spec.expert is None:
            shapes = [_parameter_value(model, p).shape for p in paths]
        else:  # no merge per expert tensor just for its shape
            shapes = [_parameter_shape(model, p)[1:] for p in paths]
        shape = (sum(s[1] for s in shapes), shapes[0][0]) if spec.transpose else shapes[0]

        def produce(paths=paths, transpose=spec.transpose, expert=spec.expert):
            parts = [to_host(value_of(p, expert).astype(target)) for p in paths]
            if transpose:
                parts = [part.T for part in parts]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

        entries.append((spec.hf_name, int(np.prod(shape)) * target.itemsize, produce))
    family = family_for_config(config)
    return family.entries_to_hf(entries, config) if hasattr(family, "entries_to_hf") else entries


def iter_hf_tensors(model: Decoder, config: ModelConfig, *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """The model as HF-named tensors ([out, in] linear layouts, LoRA merged), one at a time (for exporters)."""
    target = np.dtype(jnp.dtype(dtype if dtype is not None else config.param_dtype))
    for name, _, produce in hf_tensor_entries(model, config, target):
        yield name, produce()
