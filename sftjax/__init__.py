"""sftjax: supervised fine-tuning of decoder-only LLMs in JAX/Flax NNX.

The top-level names are imported lazily so that ``import sftjax`` stays cheap (no jax/transformers import
until a function is used).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "sftjax.models.loading",
    "save_model": "sftjax.models.loading",
    "load_tokenizer": "sftjax.models.tokenizer",
    "generate": "sftjax.infer.generate",
    "ChatSession": "sftjax.infer.chat",
    "load_config": "sftjax.config",
    "Trainer": "sftjax.train.trainer",
    "SftjaxError": "sftjax.errors",
}

# Subpackages reachable as attributes without an import of their own (``sftjax.data.pack``).
_SUBPACKAGES = ("data", "infer", "models", "peft", "train")

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sftjax.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sftjax' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
