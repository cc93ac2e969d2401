"""LoRA initializations as pure functions, following peft's ``init_lora_weights``.

Each returns ``(A [in, r], B [r, out], residual [in, out] or None)`` in our layout (peft stores ``lora_A`` as
``[r, in]``, ``lora_B`` as ``[out, r]`` and the base weight as ``[out, in]``: the transposes). ``scale`` is the
adapter's scale (alpha / r, or alpha / sqrt(r) with rsLoRA).

* ``default``: A ~ U(+-1/sqrt(in)) (torch's kaiming-uniform with a = sqrt(5)), B = 0; the base is unchanged.
* ``gaussian``: A ~ N(0, (1/r)^2), B = 0.
* ``pissa`` (PiSSA, Meng et al. 2024): from the SVD ``W = U S V^T`` of the ``[out, in]`` weight, in float32,
  the top r singular triplets with ``S_r / scale`` split evenly: ``B = U_r sqrt(S_r / scale)``,
  ``A = sqrt(S_r / scale) V_r^T``, so that ``scale * B A`` is W's best rank-r part; the base becomes the
  residual ``W - scale * B A``.
* ``olora`` (OLoRA, Büyükakyüz 2024): from the reduced QR ``W = Q R`` in float32, ``B = Q[:, :r]``,
  ``A = R[:r]``; the base becomes ``W - scale * B A``.

Sign convention: singular vectors (and QR factors) are fixed only up to a sign per component, which differs
between LAPACK builds and backends. Each component here is flipped so that the largest-magnitude entry of its
B column is positive (B and A flipped together, so ``B A`` and the residual do not change). Training from
either sign is the same trajectory mirrored, since the loss and element-wise optimizers are symmetric under it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sftjax.errors import ConfigError

INITS = ("default", "gaussian", "pissa", "olora")
RESIDUAL_INITS = ("pissa", "olora")


def default(kernel_IO, rank: int, scale: float, *, key):
    in_features, out_features = kernel_IO.shape
    bound = 1.0 / math.sqrt(in_features)
    a = jax.random.uniform(key, (in_features, rank), jnp.float32, -bound, bound)
    return a, jnp.zeros((rank, out_features), jnp.float32), None


def gaussian(kernel_IO, rank: int, scale: float, *, key):
    in_features, out_features = kernel_IO.shape
    a = jax.random.normal(key, (in_features, rank), jnp.float32) / rank
    return a, jnp.zeros((rank, out_features), jnp.float32), None


def _check_rank(kind: str, kernel_IO, rank: int, name: str) -> None:
    most = min(kernel_IO.shape)
    if rank > most:
        raise ConfigError(f"lora.init={kind}: rank {rank} exceeds the rank of {name}'s weight "
                          f"[in {kernel_IO.shape[0]}, out {kernel_IO.shape[1]}] (at most {most}); lower lora.r")


def canonical_signs(b_OR, a_RI):
    """Flip each component (column of B with the matching row of A) so that B's largest-|.| entry is positive."""
    rows = jnp.argmax(jnp.abs(b_OR), axis=0)
    signs = jnp.sign(b_OR[rows, jnp.arange(b_OR.shape[1])])
    signs = jnp.where(signs == 0, 1.0, signs).astype(b_OR.dtype)
    return b_OR * signs[None, :], a_RI * signs[:, None]


def pissa(kernel_IO, rank: int, scale: float, *, key=None, name: str = "linear"):
    _check_rank("pissa", kernel_IO, rank, name)
    w_OI = jnp.asarray(kernel_IO, jnp.float32).T
    u, s, vh = jnp.linalg.svd(w_OI, full_matrices=False)
    root = jnp.sqrt(s[:rank] / scale)
    b_OR, a_RI = canonical_signs(u[:, :rank] * root[None, :], root[:, None] * vh[:rank])
    residual_OI = w_OI - scale * (b_OR @ a_RI)
    return a_RI.T, b_OR.T, residual_OI.T


def olora(kernel_IO, rank: int, scale: float, *, key=None, name: str = "linear"):
    _check_rank("olora", kernel_IO, rank, name)
    w_OI = jnp.asarray(kernel_IO, jnp.float32).T
    q, r = jnp.linalg.qr(w_OI, mode="reduced")
    b_OR, a_RI = canonical_signs(q[:, :rank], r[:rank])
    residual_OI = w_OI - scale * (b_OR @ a_RI)
    return a_RI.T, b_OR.T, residual_OI.T


def lora_init(kind: str, kernel_IO, rank: int, scale: float, *, key, name: str = "linear"):
    """Dispatch on ``kind`` (one of :data:`INITS`): ``(A [in, r], B [r, out], residual [in, out] | None)``, float32.
    ``default``/``gaussian`` only read ``kernel_IO.shape`` (a ShapeDtypeStruct will do)."""
    if kind == "default":
        return default(kernel_IO, rank, scale, key=key)
    if kind == "gaussian":
        return gaussian(kernel_IO, rank, scale, key=key)
    if kind == "pissa":
        return pissa(kernel_IO, rank, scale, name=name)
    if kind == "olora":
        return olora(kernel_IO, rank, scale, name=name)
    raise ConfigError(f"lora.init={kind!r} is not one of {', '.join(INITS)}")
