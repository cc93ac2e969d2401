"""Which implementation ``implementation=None`` picks, per op.

Order of precedence: an explicit ``implementation=`` argument, then a default set here (from the training
config via :func:`set_default_implementation` or temporarily via :func:`use_implementation`), then the best
choice for the backend. The automatic choice is logged once per (op, choice).

The choice is made when a function is traced: set the default before the first call of a jitted train step
(jax reuses earlier traces).
"""

from __future__ import annotations

import contextlib
import logging
import threading

import jax

OPS = ("attention", "cross_entropy")
_logger = logging.getLogger("pallas_kernels")
_defaults: dict[str, str | None] = {op: None for op in OPS}
_local = threading.local()
_logged: set[tuple[str, str, str]] = set()


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"pallas_kernels: unknown op {op!r}; known ops: {OPS}")


def set_default_implementation(op: str, name: str | None) -> None:
    """Process-wide default for ``op`` ('attention' or 'cross_entropy'); None or 'auto' restores the automatic choice."""
    _check_op(op)
    _defaults[op] = None if name in (None, "auto") else name


def get_default_implementation(op: str) -> str | None:
    """The default set for ``op`` (innermost :func:`use_implementation` first), or None for automatic."""
    _check_op(op)
    stack = getattr(_local, "stack", [])
    for stacked_op, name in reversed(stack):
        if stacked_op == op:
            return name
    return _defaults[op]


@contextlib.contextmanager
def use_implementation(op: str, name: str | None):
    """Within the block (at trace time), ``implementation=None`` for ``op`` means ``name``."""
    _check_op(op)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((op, None if name in (None, "auto") else name))
    try:
        yield
    finally:
        stack.pop()


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
    """The implementation to run: explicit argument, then configured default, then ``automatic()``."""
    name = implementation or get_default_implementation(op)
    if name is None:
        name, reason = automatic()
        log_choice_once(op, name, reason)
    if name not in available:
        raise ValueError(f"{op}: unknown implementation {name!r}; available: {available}")
    return name
