"""Rotary position embeddings with the scaling variants of transformers' ``modeling_rope_utils``.

Frequencies follow transformers 5 exactly (default, linear, dynamic NTK, llama3, longrope, YaRN, proportional);
the rotation uses the "rotate half" layout of HF checkpoints, on the first ``rotary_dim`` features of each head.

Two types have frequencies that depend on the length of the sequence being run:
* dynamic NTK raises the RoPE base once the sequence is longer than ``max_position_embeddings``:
  ``base * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))``;
* longrope (Phi-3) divides the frequencies by ``long_factor`` instead of ``short_factor`` once the sequence is
  longer than ``original_max_position_embeddings``.
transformers takes ``seq_len = max(position_ids) + 1`` over the whole batch of each forward (and for dynamic NTK
keeps the largest length seen in the module until a forward shorter than the original maximum resets it). So a
short example packed beside a long one, or run in the same batch, would get the long one's frequencies.

Here the length is each sequence's own: with ``segment_ids`` it is the length of the token's segment (its largest
position + 1), without them the length of the row. Every packed example is therefore rotated exactly as
transformers rotates it when it runs alone on a fresh model, which keeps "a packed row gives the logits of its
examples run one by one" true for these types too. In decoding (a KV cache, no segments) a row's length is its
largest position + 1 in the current call, what transformers computes for a batch of one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.models.config import ModelConfig


def _base_exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim


def static_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] for every rope type whose frequencies do not depend on length."""
    dim = config.rotary_dim
    if config.rope_type == "proportional":  # Gemma 4: the first pairs rotate at head_dim-based rates, the rest not
        angles = int(config.partial_rotary_factor * config.head_dim // 2)
        inv_freq = np.zeros(config.head_dim // 2, np.float32)
        inv_freq[:angles] = 1.0 / (config.rope_theta ** _base_exponents(config.head_dim)[:angles])
        return (inv_freq / config.rope_factor).astype(np.float32)
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
    if config.rope_type == "yarn":
        return yarn_inverse_frequencies(config, inv_freq)
    raise ValueError(f"rope_type {config.rope_type!r} has length-dependent frequencies")


def yarn_inverse_frequencies(config: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    """YaRN: frequencies that turn fewer than ``beta_slow`` times over the original context are divided by
    ``factor`` (interpolated), those that turn more than ``beta_fast`` times are kept (extrapolated), with a
    linear ramp over the dimensions in between."""
    dim, base, factor = config.rotary_dim, config.rope_theta, config.rope_factor
    original = config.rope_original_max_position_embeddings or config.max_position_embeddings

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = 1 - ramp  # the share of the original (extrapolated) frequency
    return ((inv_freq / factor) * (1 - keep) + inv_freq * keep).astype(np.float32)


def yarn_attention_factor(config: ModelConfig) -> float:
    """The cos/sin scale of YaRN: ``0.1 * ln(factor) + 1`` unless the config sets it."""
    if config.rope_attention_factor is not None:
        return float(config.rope_attention_factor)
    return 1.0 if config.rope_factor <= 1 else 0.1 * math.log(config.rope_factor) + 1.0


def longrope_attention_factor(config: ModelConfig) -> float:
    if config.rope_attention_factor is not None:
        return float(config.rope_attention_factor)
    original = config.rope_original_max_position_embeddings or config.max_position_embeddings
    factor = config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def sequence_lengths(positions_BL, segment_ids_BL=None):
    """[B, L] int32: the length of the sequence each token belongs to, its segment's largest position + 1 (the
    row's when ``segment_ids_BL`` is None). Padding (segment 0) gets the length of the padding, which nothing
    reads."""
    if segment_ids_BL is None:
        return jnp.broadcast_to(jnp.max(positions_BL, axis=-1, keepdims=True) + 1, positions_BL.shape)
    num_segments = positions_BL.shape[-1] + 1  # segment ids are 0 (padding) .. at most L

    def per_row(positions_L, segments_L):
        largest = jax.ops.segment_max(positions_L, segments_L, num_segments=num_segments)
        return largest[segments_L]

    return jax.vmap(per_row)(positions_BL.astype(jnp.int32), segment_ids_BL.astype(jnp.int32)) + 1


def rope_cos_sin(config: ModelConfig, positions_BL, segment_ids_BL=None):
    """cos, sin of shape [B, L, rotary_dim] in float32 for the given integer positions; dynamic and longrope
    frequencies follow each token's own sequence (see the module docstring)."""
    dim = config.rotary_dim
    positions = positions_BL.astype(jnp.float32)
    scaling = 1.0
    if config.rope_type == "dynamic":
        seq_len_BL = jnp.maximum(sequence_lengths(positions_BL, segment_ids_BL),
                                 config.max_position_embeddings).astype(jnp.float32)
        factor = config.rope_factor
        base_BL = config.rope_theta * ((factor * seq_len_BL / config.max_position_embeddings) - (factor - 1)) ** (
            dim / (dim - 2))
        inv_freq = 1.0 / (base_BL[..., None] ** jnp.asarray(_base_exponents(dim)))  # [B, L, R/2]
    elif config.rope_type == "longrope":
        original = config.rope_original_max_position_embeddings or config.max_position_embeddings
        short = 1.0 / (np.asarray(config.rope_short_factor, np.float32) * config.rope_theta ** _base_exponents(dim))
        long = 1.0 / (np.asarray(config.rope_long_factor, np.float32) * config.rope_theta ** _base_exponents(dim))
        use_long_BL = sequence_lengths(positions_BL, segment_ids_BL) > original
        inv_freq = jnp.where(use_long_BL[..., None], jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32))
        scaling = longrope_attention_factor(config)
    else:
        inv_freq = jnp.asarray(static_inverse_frequencies(config))
        if config.rope_type == "yarn":
            scaling = yarn_attention_factor(config)
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
