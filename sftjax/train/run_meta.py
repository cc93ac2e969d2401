"""What a checkpoint records about its run, beside the arrays: the resolved config as plain JSON, which config
changes make a checkpoint unusable for a resumed run, a fingerprint of the base model it was trained from, the RNG
state as JSON, and the saved config read back as a :class:`sftjax.config.Config`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sftjax.config import SECTIONS, config_from_dict
from sftjax.errors import CheckpointError

# Config sections whose change makes a checkpoint unusable for this run (the weights would not fit or not mean
# the same thing). Other differences (learning rate, steps, logging) are allowed on resume.
DEFAULT_COMPATIBILITY_KEYS = (
    "model.path", "model.init", "model.scan_layers",
    "lora.enabled", "lora.r", "lora.alpha", "lora.rslora", "lora.target_modules", "lora.modules_to_save",
)

def config_to_dict(config: Any) -> dict | None:
    """A run config (dataclass, mapping or None) as a JSON-safe dict."""
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dataclass or a mapping, got {type(config).__name__}")
    return json.loads(json.dumps(config, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: Mapping | None, current: Mapping | None, keys=DEFAULT_COMPATIBILITY_KEYS) -> list[str]:
    """Dotted config fields under ``keys`` whose values differ, as ``"field: saved -> current"`` strings."""
    if saved is None or current is None:
        return []
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    diffs = []
    for name in sorted(set(saved_flat) | set(current_flat)):
        if not any(name == k or name.startswith(k + ".") for k in keys):
            continue
        a, b = saved_flat.get(name, "<absent>"), current_flat.get(name, "<absent>")
        if a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs


def fingerprint_model(path: str | os.PathLike) -> str:
    """A cheap identity of a model checkpoint (file names, sizes, and the first/last MiB of each file).

    Hashing every byte of a 70B model would take minutes; names + sizes + both ends catch a different model, a
    re-download of another revision or a truncated file, which is what a resume check needs.
    """
    path = pathlib.Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    chunk = 1 << 20
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else file.name}:{size}\n".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(chunk))
            if size > chunk:
                fh.seek(max(chunk, size - chunk))
                digest.update(fh.read(chunk))
    return digest.hexdigest()


def rng_to_json(rng: Any) -> Any:
    """A key, raw key data, or a nested dict of them -> JSON (key data is a handful of uint32s)."""
    if rng is None:
        return None
    if isinstance(rng, Mapping):
        return {"dict": {str(k): rng_to_json(v) for k, v in rng.items()}}
    arr = rng
    impl = None
    if isinstance(arr, jax.Array) and jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(arr))
        arr = jax.random.key_data(arr)
    data = np.asarray(jax.device_get(arr))
    return {"impl": impl, "dtype": str(data.dtype), "shape": list(data.shape), "data": data.ravel().tolist()}


def rng_from_json(obj: Any) -> Any:
    if obj is None:
        return None
    if "dict" in obj:
        return {k: rng_from_json(v) for k, v in obj["dict"].items()}
    data = np.asarray(obj["data"], dtype=obj["dtype"]).reshape(obj["shape"])
    if obj["impl"] is not None:
        return jax.random.wrap_key_data(data, impl=obj["impl"])
    return jax.numpy.asarray(data)

def run_config(meta: Mapping, where) -> Any:
    """The run's :class:`sftjax.config.Config` from a checkpoint's meta (older metas kept the checkpoint section
    under ``extra``)."""
    saved = dict(meta.get("config") or {})
    extra = saved.pop("extra", None) or {}
    saved.pop("source_path", None)
    if "checkpoint" in extra and "checkpoint" not in saved:
        saved["checkpoint"] = extra["checkpoint"]
    try:
        return config_from_dict({k: v for k, v in saved.items() if k in SECTIONS and v is not None}, purpose="model")
    except Exception as error:  # a ConfigError, or a config written by another version
        raise CheckpointError(f"{where}: the run config saved with this checkpoint does not load "
                              f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
