"""sftjax's kernels: segment-aware attention and fused linear cross-entropy.

Each op has one entry point (``api.py``) that picks an implementation per backend, a plain-jnp reference
(``reference.py``, the oracle every other version is tested against) and faster versions. The choice for
``implementation=None`` can be configured with :func:`set_default_implementation` or :func:`use_implementation`.
"""

from pallas_kernels.dispatch import get_default_implementation, set_default_implementation, use_implementation

__all__ = ["get_default_implementation", "set_default_implementation", "use_implementation"]
