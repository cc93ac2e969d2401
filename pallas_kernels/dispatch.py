"""Which implementation an op runs: the explicit ``implementation=`` argument, else the op's automatic choice for
the backend (logged once per choice). The choice is made when a function is traced, so it is part of what jax
caches: pass it as a static value (the decoder and the loss hold it as a field), never through global state.
"""

from __future__ import annotations

import logging

import jax

from pallas_kernels import choices

OPS = ("attention", "cross_entropy")
_logger = logging.getLogger("pallas_kernels")
_logged: set[tuple[str, str, str]] = set()


def backend() -> str:
    """'cpu', 'gpu' or 'tpu' for the default backend."""
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def log_choice_once(op: str, name: str, reason: str) -> None:
    key = (op, name, reason)
    if key not in _logged:
        _logged.add(key)
        _logger.info("%s uses implementation %r (%s)", op, name, reason)


def resolve(op: str, implementation: str | None, available: tuple[str, ...], automatic) -> str:
    """The implementation to run: ``implementation`` when given (not None/"auto"), else ``automatic()``."""
    if op not in OPS:
        raise ValueError(f"pallas_kernels: unknown op {op!r}; known ops: {OPS}")
    name = choices.explicit(implementation)
    if name is None:
        name, reason = automatic()
        log_choice_once(op, name, reason)
    if name not in available:
        raise ValueError(f"{op}: unknown implementation {name!r}; available: {', '.join(available)}")
    return name
