"""Data: sources -> canonical conversations -> tokens + train masks -> packed batches.

``encode_example`` (chat.py) and ``pack`` (packing.py) are imported lazily so ``import sftjax.data`` is cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "encode_example": "sftjax.data.chat",
    "encode_rows": "sftjax.data.chat",
    "DroppedExample": "sftjax.data.chat",
    "to_conversation": "sftjax.data.formats",
    "iter_rows": "sftjax.data.sources",
            "pack": "sftjax.data.packing",
    "PackingStats": "sftjax.data.packing",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sftjax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
