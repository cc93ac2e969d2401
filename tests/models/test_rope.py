"""RoPE cos/sin against transformers' rotary embedding modules, for every supported rope type."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require  # noqa: E402

torch = require("torch")
transformers = require("transformers")

import jax.numpy as jnp  # noqa: E402

from sftjax.models.registry import config_from_hf  # noqa: E402
from sftjax.models.rope import apply_rope, rope_cos_sin, sequence_lengths  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32)

CASES = {
    "default": ("Llama", dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "linear": ("Llama", dict(BASE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "llama3": ("Llama", dict(BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 16})),
    "dynamic": ("Llama", dict(BASE, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "legacy_rope_scaling": ("Llama", dict(BASE, rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0})),
    "phi3_partial_longrope": ("Phi3", dict(BASE, partial_rotary_factor=0.5, original_max_position_embeddings=16,
                                           rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                            "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
                                                            "long_factor": [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0]})),
    # YaRN: gpt-oss's parameters (no truncation), the defaults (truncated range), explicit betas and scale, and
    # DeepSeek's mscale pair folded into the attention factor
    "yarn_gpt_oss": ("Llama", dict(BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                         "original_max_position_embeddings": 16})),
    "yarn_default": ("Llama", dict(BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                         "original_max_position_embeddings": 16})),
    "yarn_betas_scale": ("Llama", dict(BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                             "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                                                             "attention_factor": 1.3,
                                                             "original_max_position_embeddings": 16})),
    "yarn_mscale": ("Llama", dict(BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                        "mscale": 1.0, "mscale_all_dim": 0.5,
                                                        "original_max_position_embeddings": 16})),
}


def _hf_cos_sin(kind, kwargs, positions):
    config = getattr(transformers, f"{kind}Config")(**kwargs)
    module = getattr(transformers.models, kind.lower())
    rotary = getattr(getattr(module, f"modeling_{kind.lower()}"), f"{kind}RotaryEmbedding")(config)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, torch.tensor(positions, dtype=torch.long))
    return config, cos.numpy(), sin.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("length", [12, 40])  # within and beyond max_position_embeddings / the original length
def test_cos_sin_match_transformers(case, length):
    kind, kwargs = CASES[case]
    positions = np.arange(length)[None]
    hf_config, cos_ref, sin_ref = _hf_cos_sin(kind, kwargs, positions)
    config = config_from_hf(hf_config.to_dict())
    cos, sin = rope_cos_sin(config, jnp.asarray(positions, jnp.int32))
    assert cos.shape == cos_ref.shape
    np.testing.assert_allclose(np.asarray(cos), cos_ref, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_ref, atol=2e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_segments_get_the_frequencies_they_get_alone(case):
    """Segments of 40, 9 and 20 tokens (beyond and within the original length of 16/32) in one row, and a row of
    6 beside them: each token's cos/sin equal transformers' rotary module run on that sequence alone (a fresh
    module per sequence, so that dynamic NTK's remembered length does not leak between them)."""
    kind, kwargs = CASES[case]
    lengths = [[40, 9, 20], [6]]
    positions = np.zeros((2, 72), np.int32)
    segments = np.zeros((2, 72), np.int32)
    for row, row_lengths in enumerate(lengths):
        start = 0
        for segment, n in enumerate(row_lengths, start=1):
            positions[row, start:start + n] = np.arange(n)
            segments[row, start:start + n] = segment
            start += n
    hf_config = getattr(transformers, f"{kind}Config")(**kwargs)
    config = config_from_hf(hf_config.to_dict())
    cos, sin = (np.asarray(x) for x in rope_cos_sin(config, jnp.asarray(positions), jnp.asarray(segments)))
    np.testing.assert_array_equal(np.asarray(sequence_lengths(jnp.asarray(positions), jnp.asarray(segments)))[0, :69],
                                  np.repeat([40, 9, 20], [40, 9, 20]))
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths:
            _, cos_alone, sin_alone = _hf_cos_sin(kind, kwargs, np.arange(n)[None])
            assert_close(cos[row, start:start + n], cos_alone[0], 2e-6, what=f"{case} cos of a {n}-token sequence")
            assert_close(sin[row, start:start + n], sin_alone[0], 2e-6, what=f"{case} sin of a {n}-token sequence")
            start += n


def test_dynamic_scaling_changes_only_beyond_the_original_length():
    kind, kwargs = CASES["dynamic"]
    plain = config_from_hf(getattr(transformers, "LlamaConfig")(**CASES["default"][1]).to_dict())
    dynamic = config_from_hf(getattr(transformers, "LlamaConfig")(**kwargs).to_dict())
    short = jnp.arange(32)[None]
    long = jnp.arange(48)[None]
    np.testing.assert_allclose(rope_cos_sin(dynamic, short)[0], rope_cos_sin(plain, short)[0], atol=1e-6)
    assert np.abs(np.asarray(rope_cos_sin(dynamic, long)[0] - rope_cos_sin(plain, long)[0])).max() > 1e-2


def test_apply_rope_matches_rotate_half_and_passes_the_rest_through():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
    angles = rng.normal(size=(1, 5, 2)).astype(np.float32)
    cos = np.cos(np.concatenate([angles, angles], -1))
    sin = np.sin(np.concatenate([angles, angles], -1))
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin)))
    x1, x2 = x[..., :2], x[..., 2:4]
    c, s = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    np.testing.assert_allclose(out[..., :2], x1 * c - x2 * s, atol=1e-6)
    np.testing.assert_allclose(out[..., 2:4], x2 * c + x1 * s, atol=1e-6)
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
