"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors shards).

Reading yields one tensor at a time (``safe_open`` per file, ``get_tensor`` per name) so the caller can place
it and drop it before the next one is read. Writing plans the shards from names and byte sizes first, then
materializes one shard at a time: host memory stays around one shard.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator

import numpy as np

from sftjax.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_config_json(directory: pathlib.Path) -> dict:
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: expected a Hugging Face checkpoint directory or a .gguf file")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found in the checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The shard files of a checkpoint, from the index when there is one; every listed shard must exist."""
    directory = pathlib.Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({error!r})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: shard listed in {INDEX_NAME} is missing")
        return files
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if (directory / "config.json").is_file() and not any(directory.glob("*.bin")):
            raise CheckpointError(f"{directory}: holds only config.json (the architecture, enough for `sftjax plan`), no "
                                  "weights; download the model's *.safetensors into it or set model.path to a copy")
        raise CheckpointError(f"{directory}: no *.safetensors weights found (pytorch .bin checkpoints are not "
                              "supported; convert them with transformers' save_pretrained)")
    return files


def iter_safetensors(directory: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) for every tensor of every shard, one at a time."""
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(directory):
        try:
            with safe_open(str(file), framework="np") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except SafetensorError as error:
            message = str(error).splitlines()[0]
            raise CheckpointError(f"{file}: cannot read safetensors file, truncated or corrupt ({message})") from None


def write_safetensors(tensors: list[tuple[str, int, Callable[[], np.ndarray]]], directory: pathlib.Path, *,
                      max_shard_bytes: int) -> list[pathlib.Path]:
    """Write (name, nbytes, produce) tensors as ``model.safetensors`` or shards of at most ``max_shard_bytes``
    (a single tensor larger than the limit gets a shard of its own) plus the index. Returns the files written."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    shards: list[list[tuple[str, int, Callable]]] = [[]]
    shard_bytes = 0
    for entry in tensors:
        if shards[-1] and shard_bytes + entry[1] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += entry[1]
    for stale in [directory / SINGLE_NAME, directory / INDEX_NAME, *directory.glob("model-*-of-*.safetensors")]:
        if stale.is_file():
            stale.unlink()
    written = []
    weight_map = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        name = SINGLE_NAME if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for tensor_name, nbytes, produce in shard:
            arrays[tensor_name] = np.ascontiguousarray(produce())
            weight_map[tensor_name] = name
            total += nbytes
        save_file(arrays, str(directory / name), metadata={"format": "pt"})
        del arrays
        written.append(directory / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        written.append(directory / INDEX_NAME)
    return written
