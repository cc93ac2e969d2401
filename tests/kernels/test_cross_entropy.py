"""Fused linear cross-entropy implementations against the plain-jnp reference: sums, d_hidden and d_weight.

Random inputs with a [B, L] token layout, a loss mask that leaves whole token blocks untrained (exercising the
skipped blocks) and a vocabulary the chunk size does not divide. Pallas kernels run in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_entropy import api
from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy, project_logits
from pallas_kernels.cross_entropy.pallas_rows import fused_linear_cross_entropy_pallas
from pallas_kernels.cross_entropy.reference import fused_linear_cross_entropy_reference
from pallas_kernels.cross_entropy.xla_chunked import fused_linear_cross_entropy_xla_chunked

HIDDEN = 32
VOCAB = 300


def relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def random_inputs(seed, *, batch=2, length=37, vocab=VOCAB):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(keys[0], (batch, length, HIDDEN), jnp.float32)
    weight = jax.random.normal(keys[1], (HIDDEN, vocab), jnp.float32) * 0.5
    targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
    # Half the targets are the model's own argmax, so correct_count is non-trivial.
    argmax = jnp.argmax(hidden @ weight, axis=-1)
    targets = jnp.where(jnp.arange(length) % 2 == 0, argmax, targets)
    loss_mask = (jax.random.uniform(keys[3], (batch, length)) > 0.3).astype(jnp.int32)
    loss_mask = loss_mask.at[0, :20].set(0)  # a run of untrained tokens: at least one whole block skipped
    return hidden, weight, targets, loss_mask


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("logit_softcap", "z_loss"))
def loss_and_grads(fn, hidden, weight, targets, loss_mask, scale, logit_softcap=None, z_loss=0.0):
    def loss(hidden, weight):
        result = fn(hidden, weight, targets, loss_mask, logit_softcap=logit_softcap, z_loss=z_loss)
        return result.loss_sum * scale, result

    (_, result), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, weight)
    return result, grads


def check_against_reference(implementation, *, seed, dtype, tolerance, vocab=VOCAB, **options):
    hidden, weight, targets, loss_mask = random_inputs(seed, vocab=vocab)
    scale = jnp.float32(0.37)
    expected, expected_grads = loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, targets,
                                              loss_mask, scale, **options)
    actual, actual_grads = loss_and_grads(implementation, hidden.astype(dtype), weight.astype(dtype), targets,
                                          loss_mask, scale, **options)
    assert relative_error(actual.loss_sum, expected.loss_sum) <= tolerance
    assert float(actual.token_count) == float(expected.token_count) > 0
    if dtype == jnp.float32:
        assert float(actual.correct_count) == float(expected.correct_count) > 0
    for name, got, want in zip(("d_hidden", "d_weight"), actual_grads, expected_grads):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert relative_error(got, want) <= tolerance, name


IMPLEMENTATIONS = {
    "xla_chunked": functools.partial(fused_linear_cross_entropy_xla_chunked, block_t=16, block_v=64),
    "pallas_gpu_interpret": functools.partial(fused_linear_cross_entropy_pallas, platform="gpu", interpret=True,
                                              block_t=16, block_v=64, block_rows=8),
    "pallas_tpu_interpret": functools.partial(fused_linear_cross_entropy_pallas, platform="tpu", interpret=True,
                                              block_t=16, block_v=128, block_rows=8),
}
OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"logit_softcap": 3.0}, id="softcap"),
    pytest.param({"z_loss": 1e-3}, id="z_loss"),
]


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", OPTIONS)
def test_float32_matches_reference(name, options):
    check_against_reference(IMPLEMENTATIONS[name], seed=len(name), dtype=jnp.float32, tolerance=1e-5, **options)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_bfloat16_close_to_float32_reference(name):
    check_against_reference(IMPLEMENTATIONS[name], seed=3, dtype=jnp.bfloat16, tolerance=2e-2, logit_softcap=5.0)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("vocab", [997, 1000, 40])
def test_pallas_default_chunks_at_odd_vocabularies(platform, vocab):
    """Default blocks: the chunk is derived from V (a power of two <= V on GPU, sliding back at the end; on TPU
    the tile padded to 128 lanes and the padding masked), forward and gradients against the reference."""
    check_against_reference(functools.partial(fused_linear_cross_entropy_pallas, platform=platform, interpret=True),
                            seed=vocab, dtype=jnp.float32, tolerance=1e-5, vocab=vocab, logit_softcap=4.0,
                            z_loss=1e-3)


def test_chunk_width_rules():
    from pallas_kernels.cross_entropy.pallas_rows import chunk_width

    assert chunk_width(997, 1024, "gpu") == (512, 997)
    assert chunk_width(151936, 1024, "gpu") == (1024, 151936)
    assert chunk_width(40, 1024, "gpu") == (32, 40)
    assert chunk_width(997, 1024, "tpu") == (1024, 1024)
    assert chunk_width(32000, 1024, "tpu") == (1024, 32000)
    assert chunk_width(300, 64, "tpu") == (128, 384)


@pytest.mark.parametrize("name", ["xla_chunked", "pallas_gpu_interpret"])
def test_no_trained_tokens_gives_zero_not_nan(name):
    hidden, weight, targets, loss_mask = random_inputs(4)
    result, (d_hidden, d_weight) = loss_and_grads(IMPLEMENTATIONS[name], hidden, weight, targets,
                                                  jnp.zeros_like(loss_mask), jnp.float32(1.0))
    assert float(result.loss_sum) == 0.0 and float(result.token_count) == 0.0
    assert not np.any(np.asarray(d_hidden)) and not np.any(np.asarray(d_weight))


@pytest.mark.parametrize("name", ["reference", "xla_chunked", "pallas_gpu_interpret"])
def test_entry_point_runs_each_implementation(name):
    hidden, weight, targets, loss_mask = random_inputs(5)
    fn = functools.partial(fused_linear_cross_entropy, implementation=name)
    actual, actual_grads = loss_and_grads(fn, hidden, weight, targets, loss_mask, jnp.float32(1.0))
    expected, expected_grads = loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, targets,
                                              loss_mask, jnp.float32(1.0))
    assert relative_error(actual.loss_sum, expected.loss_sum) <= 1e-5
    for got, want in zip(actual_grads, expected_grads):
        assert relative_error(got, want) <= 1e-5


def test_project_logits_matches_matmul():
    hidden, weight, _, _ = random_inputs(6)
    logits = project_logits(hidden, weight, logit_softcap=4.0)
    expected = np.tanh(np.einsum("bld,dv->blv", np.asarray(hidden, np.float64), np.asarray(weight, np.float64))
                       / 4.0) * 4.0
    assert logits.dtype == jnp.float32 and relative_error(logits, expected) <= 1e-5


def test_explicit_and_automatic_choice():
    hidden, weight, targets, loss_mask = random_inputs(7)
    assert api.automatic_implementation("cpu", 1000)[0] == "reference"
    assert api.automatic_implementation("cpu", api.CHUNKED_MIN_LOGITS)[0] == "xla_chunked"
    with pytest.raises(ValueError, match="unknown implementation 'no_such_kernel'"):
        fused_linear_cross_entropy(hidden, weight, targets, loss_mask, implementation="no_such_kernel")
    fused_linear_cross_entropy(hidden, weight, targets, loss_mask, implementation="auto")


def test_bad_inputs_fail_at_trace_time_with_one_line_message():
    hidden, weight, targets, loss_mask = random_inputs(8)
    bad_cases = [
        (ValueError, "hidden dim", (hidden, weight[:16], targets, loss_mask)),
        (ValueError, "must match hidden's leading shape", (hidden, weight, targets[:, :5], loss_mask)),
        (ValueError, "must match hidden's leading shape", (hidden, weight, targets, loss_mask[:1])),
        (TypeError, "hidden must be floating-point", (hidden.astype(jnp.int32), weight, targets, loss_mask)),
        (TypeError, "targets must be integers", (hidden, weight, targets.astype(jnp.float32), loss_mask)),
    ]
    for error, message, args in bad_cases:
        with pytest.raises(error, match=message) as caught:
            jax.jit(fused_linear_cross_entropy).lower(*args)
        assert "\n" not in str(caught.value)
