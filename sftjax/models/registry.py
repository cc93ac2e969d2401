"""Which family file handles which Hugging Face architecture."""

from __future__ import annotations

import importlib
from types import ModuleType

from sftjax.errors import CheckpointError

FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma4", "phi3", "mixtral",
                 "qwen3_moe", "gpt_oss")


def _family(name: str) -> ModuleType:
    return importlib.import_module(f"sftjax.models.families.{name}")


def supported_architectures() -> tuple[str, ...]:
    return tuple(arch for name in FAMILY_MODULES for arch in _family(name).ARCHITECTURES)


def family_for_hf(hf: dict, *, source: str = "config.json") -> ModuleType:
    """The family module for a config.json dict, chosen by ``architectures`` (else ``model_type``)."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for name in FAMILY_MODULES:
        family = _family(name)
        if any(arch in family.ARCHITECTURES for arch in architectures):
            return family
    if not architectures:
        for name in FAMILY_MODULES:
            if _family(name).MODEL_TYPE == model_type:
                return _family(name)
    found = ", ".join(architectures) or f"model_type {model_type!r}"
    raise CheckpointError(f"{source}: unsupported architecture {found}; supported: "
                          f"{', '.join(supported_architectures())}")


def family_for_config(config) -> ModuleType:
    for name in FAMILY_MODULES:
        if _family(name).MODEL_TYPE == config.family:
            return _family(name)
    raise CheckpointError(f"model config: unknown family {config.family!r}; supported: {', '.join(FAMILY_MODULES)}")


def config_from_hf(hf: dict, *, source: str = "config.json"):
    return family_for_hf(hf, source=source).config_from_hf(hf, source=source)
