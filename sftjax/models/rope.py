"""Rotary position embeddings with the scaling variants of transformers' ``modeling_rope_utils``.

Frequencies follow transformers 5 exactly (default, linear, dynamic NTK, llama3, longrope); the rotation uses
the "rotate half" layout of HF checkpoints, on the first ``rotary_dim`` features of each head.

Dynamic NTK scaling is stateless here: the frequencies are computed from ``seq_len = max(positions) + 1`` of the
batch, clamped below at ``max_position_embeddings`` (so up to the original length they equal the unscaled ones).
transformers does the same per forward, except that it caches the largest length seen and keeps using it until
the length drops back below the original maximum; on a fresh model (every training-style forward) both agree.
Longrope likewise picks the long factors when ``max(positions) + 1`` exceeds the original maximum. In a packed
batch ``positions`` restart per segment, so the length that counts is the longest segment of the batch (what
transformers computes from the same position ids); an example packed beside a longer one may therefore get the
scaled frequencies that it would not get alone. Only dynamic and longrope behave so; every other type is exact.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sftjax.models.config import ModelConfig


def _base_exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim


def static_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] for every rope type whose frequencies do not depend on length."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** _base_exponents(dim))
    if config.rope_type in ("default", "dynamic"):
        return inv_freq.astype(np.float32)
    if config.rope_type == "linear":
        return (inv_freq / config.rope_factor).astype(np.float32)
    if config.rope_type == "llama3":
        factor = config.rope_factor
        old_len = config.rope_original_max_position_embeddings or config.max_position_embeddings
        low_wavelen = old_len / config.rope_low_freq_factor
        high_wavelen = old_len / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type {config.rope_type!r} has length-dependent frequencies")


def longrope_attention_factor(config: ModelConfig) -> float:
    if config.rope_attention_factor is not None:
        return float(config.rope_attention_factor)
    original = config.rope_original_max_position_embeddings or config.max_position_embeddings
    factor = config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_cos_sin(config: ModelConfig, positions_BL):
    """cos, sin of shape [B, L, rotary_dim] in float32 for the given integer positions."""
    dim = config.rotary_dim
    positions = positions_BL.astype(jnp.float32)
    scaling = 1.0
    if config.rope_type == "dynamic":
        seq_len = jnp.maximum(jnp.max(positions_BL) + 1, config.max_position_embeddings).astype(jnp.float32)
        factor = config.rope_factor
        base = config.rope_theta * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (
            dim / (dim - 2))
        inv_freq = 1.0 / (base ** jnp.asarray(_base_exponents(dim)))
    elif config.rope_type == "longrope":
        original = config.rope_original_max_position_embeddings or config.max_position_embeddings
        short = 1.0 / (np.asarray(config.rope_short_factor, np.float32) * config.rope_theta ** _base_exponents(dim))
        long = 1.0 / (np.asarray(config.rope_long_factor, np.float32) * config.rope_theta ** _base_exponents(dim))
        use_long = jnp.max(positions_BL) + 1 > original
        inv_freq = jnp.where(use_long, jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32))
        scaling = longrope_attention_factor(config)
    else:
        inv_freq = jnp.asarray(static_inverse_frequencies(config))
    freqs = positions[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def apply_rope(x_BLHD, cos_BLR, sin_BLR):
    """Rotate the first R features of every head ("rotate half" layout); the rest pass through."""
    rotary_dim = cos_BLR.shape[-1]
    dtype = x_BLHD.dtype
    cos = cos_BLR[:, :, None, :].astype(dtype)
    sin = sin_BLR[:, :, None, :].astype(dtype)
    x_rot, x_pass = x_BLHD[..., :rotary_dim], x_BLHD[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated_half * sin
    if x_pass.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out
