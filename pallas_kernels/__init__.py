"""sftjax's kernels: segment-aware attention and fused linear cross-entropy.

Each op has one entry point (``attention.api.attention``, ``cross_entropy.api.fused_linear_cross_entropy``) that
takes ``implementation=`` (a name from :mod:`pallas_kernels.choices`, or None / "auto" for the best choice on
the backend), a plain-jnp reference (``reference.py``, the oracle every other version is tested against) and
faster versions. There is no process-wide default: the caller passes the choice. Importing this package does not
import jax.
"""
