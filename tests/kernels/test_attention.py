"""Every attention implementation against the dense jnp reference: outputs and dq/dk/dv, fp32 and bf16.

Inputs are fresh random arrays with ragged packed segments (including a length-1 segment and padding);
Pallas kernels run in interpret mode on tiny shapes.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.attention import api
from pallas_kernels.attention.api import attention
from pallas_kernels.attention.cudnn import attention_cudnn
from pallas_kernels.attention.pallas_gpu import attention_pallas_gpu
from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.splash_tpu import attention_splash_tpu
from pallas_kernels.attention.xla_chunked import attention_xla_chunked

NUM_Q_HEADS = 8
HEAD_DIM = 16


def relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def packed_segments(batch, length, seed):
    """Ragged segments per row: random lengths, one of length 1, then padding (0)."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, length), np.int32)
    for row in range(batch):
        position, segment = 0, 1
        lengths = [int(rng.integers(2, max(3, length // 3))), 1] + list(rng.integers(2, max(3, length // 2), size=4))
        for size in lengths:
            size = min(size, length - 6 - position)
            if size <= 0:
                break
            segments[row, position:position + size] = segment
            position += size
            segment += 1
    return jnp.asarray(segments)


def random_inputs(seed, *, batch=2, length=64, num_kv_heads=2, dtype=jnp.float32, head_dim=HEAD_DIM):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, NUM_Q_HEADS, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim), jnp.float32)
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q, k, v, packed_segments(batch, length, seed), d_out


def check_against_reference(implementation, *, seed, num_kv_heads, dtype, tolerance, length=64, head_dim=HEAD_DIM,
                            segments=None, **options):
    q, k, v, packed, d_out = random_inputs(seed, length=length, num_kv_heads=num_kv_heads, head_dim=head_dim)
    segments = packed if segments is None else segments

    @functools.partial(jax.jit, static_argnums=0)
    def forward_and_grads(fn, q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segments, **options), q, k, v)
        return out, vjp(d_out)

    expected, expected_grads = forward_and_grads(attention_reference, q, k, v, d_out)
    cast = [x.astype(dtype) for x in (q, k, v, d_out)]
    actual, actual_grads = forward_and_grads(implementation, *cast)
    assert actual.dtype == dtype and actual.shape == q.shape
    assert relative_error(actual, expected) <= tolerance
    for name, got, want in zip(("dq", "dk", "dv"), actual_grads, expected_grads):
        assert got.shape == want.shape, name
        assert relative_error(got, want) <= tolerance, name


CASES = [
    pytest.param(8, {}, id="mha-causal"),
    pytest.param(2, {"sliding_window": 9}, id="gqa4-window"),
    pytest.param(1, {"logit_softcap": 2.0}, id="mqa8-softcap"),
    pytest.param(2, {"causal": False, "scale": 0.3}, id="gqa4-noncausal-scale"),
]
IMPLEMENTATIONS = {
    "xla_chunked": functools.partial(attention_xla_chunked, block_q=16, block_k=32),
    "pallas_gpu_interpret": functools.partial(attention_pallas_gpu, block_q=16, block_k=16, interpret=True),
    "splash_tpu_interpret": functools.partial(attention_splash_tpu, block=128, interpret=True),
}


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("num_kv_heads, options", CASES)
def test_float32_matches_reference(name, num_kv_heads, options):
    check_against_reference(IMPLEMENTATIONS[name], seed=zlib.crc32(name.encode()) % 1000 + num_kv_heads,
                            num_kv_heads=num_kv_heads, dtype=jnp.float32, tolerance=1e-5, **options)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_bfloat16_close_to_float32_reference(name):
    check_against_reference(IMPLEMENTATIONS[name], seed=7, num_kv_heads=2, dtype=jnp.bfloat16, tolerance=2e-2,
                            sliding_window=20)


@pytest.mark.parametrize("head_dim", [80, 96])
def test_pallas_gpu_head_dim_not_power_of_two(head_dim):
    """Phi-3's 96 and 80 are zero-padded to 128 inside (Triton's power-of-two tiles); outputs and grads exact."""
    check_against_reference(functools.partial(attention_pallas_gpu, block_q=16, block_k=16, interpret=True),
                            seed=head_dim, num_kv_heads=2, dtype=jnp.float32, tolerance=1e-5, head_dim=head_dim,
                            sliding_window=24)


def long_segments(length):
    """Row 0: one segment over most of the row, then padding; row 1: segments 1, 2, 1 again (ids, not runs,
    decide visibility), then padding. Most tiles are interior; some lie in one segment each side but differ."""
    rows = np.zeros((2, length), np.int32)
    rows[0, :length - 9] = 1
    third = (length - 8) // 3
    rows[1, :third], rows[1, third:2 * third], rows[1, 2 * third:3 * third] = 1, 2, 1
    return jnp.asarray(rows)


@pytest.mark.parametrize("options", [{}, {"sliding_window": 40}, {"causal": False},
                                     {"causal": False, "sliding_window": 33}, {"logit_softcap": 3.0}],
                         ids=["causal", "window", "full", "full-window", "softcap"])
def test_pallas_gpu_interior_tiles_and_per_kernel_blocks(options):
    """Long segments, so most tiles take the mask-free branch; each kernel with its own tiles and launch params;
    with a causal mask the query blocks run in reverse order."""
    from pallas_kernels.attention.pallas_gpu import BlockSizes

    blocks = BlockSizes(block_q=32, block_k=16, num_warps=2, block_q_dkv=16, block_k_dkv=32, num_stages_dkv=1,
                        block_q_dq=16, block_k_dq=16, num_warps_dq=8)
    check_against_reference(functools.partial(attention_pallas_gpu, block_sizes=blocks, interpret=True), seed=21,
                            num_kv_heads=2, dtype=jnp.float32, tolerance=1e-5, length=128,
                            segments=long_segments(128), **options)


def test_pallas_gpu_block_sizes_are_checked():
    from pallas_kernels.attention.pallas_gpu import BlockSizes

    with pytest.raises(ValueError, match="block_k_dq must be a power of two"):
        BlockSizes(block_k_dq=48)
    assert BlockSizes.for_head_dim(96) == BlockSizes.for_head_dim(128)


def test_xla_chunked_with_length_not_multiple_of_block():
    check_against_reference(functools.partial(attention_xla_chunked, block_q=16, block_k=16), seed=3,
                            num_kv_heads=4, dtype=jnp.float32, tolerance=1e-5, length=50)


@pytest.mark.parametrize("options", [{}, {"sliding_window": 5}, {"causal": False}])
def test_cudnn_wrapper_mask_via_xla(options):
    """The cuDNN wrapper's mask construction, run by jax's XLA implementation (no GPU here)."""
    check_against_reference(functools.partial(attention_cudnn, implementation="xla"), seed=11, num_kv_heads=2,
                            dtype=jnp.float32, tolerance=1e-5, **options)


def test_cudnn_refuses_softcap():
    q, k, v, segments, _ = random_inputs(0)
    with pytest.raises(ValueError, match="logit_softcap"):
        attention_cudnn(q, k, v, segments, logit_softcap=2.0)


def test_packed_row_equals_examples_run_alone():
    """Two packed segments give the same outputs as each example alone (xla_chunked)."""
    q, k, v, _, _ = random_inputs(5, batch=1, length=48)
    segments = jnp.asarray([[1] * 20 + [2] * 28], jnp.int32)
    chunked = jax.jit(functools.partial(attention_xla_chunked, block_q=16, block_k=16))
    packed = chunked(q, k, v, segments)
    ones = lambda n: jnp.ones((1, n), jnp.int32)  # noqa: E731
    first = chunked(q[:, :20], k[:, :20], v[:, :20], ones(20))
    second = chunked(q[:, 20:], k[:, 20:], v[:, 20:], ones(28))
    assert relative_error(packed, jnp.concatenate([first, second], axis=1)) <= 1e-5


@pytest.mark.parametrize("name", ["reference", "xla_chunked", "pallas_gpu_interpret"])
def test_entry_point_runs_each_implementation(name):
    q, k, v, segments, _ = random_inputs(2, length=32)
    out = jax.jit(functools.partial(attention, implementation=name, sliding_window=12))(q, k, v, segments)
    assert relative_error(out, attention_reference(q, k, v, segments, sliding_window=12)) <= 1e-5


def test_explicit_choice_and_automatic_choice(monkeypatch):
    calls = []
    real = attention_xla_chunked

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr("pallas_kernels.attention.xla_chunked.attention_xla_chunked", spy)
    q, k, v, segments, _ = random_inputs(1, length=16)
    jax.jit(lambda *args: attention(*args, implementation="xla_chunked")).lower(q, k, v, segments)
    assert len(calls) == 1
    jax.jit(lambda *args: attention(*args)).lower(q, k, v, segments)  # automatic choice on CPU for short rows: the reference
    jax.jit(lambda *args: attention(*args, implementation="auto")).lower(q, k, v, segments)
    assert len(calls) == 1


def test_automatic_choice_per_backend():
    assert api.automatic_implementation("cpu", api.CPU_CHUNKED_MIN_LENGTH - 1)[0] == "reference"
    assert api.automatic_implementation("cpu", api.CPU_CHUNKED_MIN_LENGTH)[0] == "xla_chunked"
    assert api.automatic_implementation("tpu", 16)[0] == "splash_tpu"
    assert api.automatic_implementation("gpu", 4096)[0] == "xla_chunked"


def test_no_process_wide_default_remains():
    assert not any(hasattr(pallas_kernels, name) for name in ("set_default_implementation", "use_implementation"))
    from pallas_kernels import dispatch

    assert not any(hasattr(dispatch, name) for name in ("set_default_implementation", "use_implementation",
                                                        "get_default_implementation", "_defaults"))


def test_unknown_implementation_and_op_are_errors():
    from pallas_kernels import dispatch

    q, k, v, segments, _ = random_inputs(1, length=16)
    with pytest.raises(ValueError, match="unknown implementation 'flash9'"):
        attention(q, k, v, segments, implementation="flash9")
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.resolve("softmax", "reference", ("reference",), lambda: ("reference", ""))


def test_bad_inputs_fail_at_trace_time_with_one_line_message():
    q, k, v, segments, _ = random_inputs(1, length=16, num_kv_heads=2)
    bad_cases = [
        (ValueError, "kv heads do not divide", (q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2),
                                               segments)),
        (ValueError, "segment_ids shape", (q, k, v, segments[:, :8])),
        (ValueError, "head_dim", (q, k[..., :8], v[..., :8], segments)),
        (ValueError, "expected q", (q, k, v[:, :, :1], segments)),
        (TypeError, "floating-point", (q.astype(jnp.int32), k, v, segments)),
        (TypeError, "segment_ids must be integers", (q, k, v, segments.astype(jnp.float32))),
    ]
    for error, message, args in bad_cases:
        with pytest.raises(error, match=message) as caught:
            jax.jit(attention).lower(*args)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="sliding_window"):
        attention(q, k, v, segments, sliding_window=0)


def test_segment_block_ranges_cover_every_nonempty_tile_and_skip_others():
    from pallas_kernels.attention.pallas_gpu import segment_block_ranges
    from pallas_kernels.attention.reference import attention_mask

    segments = jnp.concatenate([packed_segments(2, 64, 9), jnp.asarray([[1, 2, 0, 3] * 16], jnp.int32)])
    key_range, query_range = map(np.asarray, segment_block_ranges(segments, 8, 16))
    tiles = np.asarray(attention_mask(segments, causal=False)).reshape(3, 8, 8, 4, 16).any(axis=(2, 4))
    for row in range(3):
        for qi in range(8):
            for kj in range(4):
                if tiles[row, qi, kj]:
                    assert key_range[row, qi, 0] <= kj < key_range[row, qi, 1]
                    assert query_range[row, kj, 0] <= qi < query_range[row, kj, 1]
    # Contiguous packed segments: the ranges are exactly the non-empty tiles.
    assert key_range[:2, :, 1].sum() - key_range[:2, :, 0].sum() == tiles[:2].sum()
