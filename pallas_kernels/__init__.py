"""sftjax's kernels: segment-aware attention and fused linear cross-entropy.

Each op has one entry point (``api.py``) that picks an implementation per backend, a plain-jnp reference
(``reference.py``, the oracle every other version is tested against) and faster versions.
"""
