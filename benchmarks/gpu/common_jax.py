"""JAX helpers of the stages: the implementations by name, timing, errors, ceilings, packed rows.

Timing: device work is asynchronous, so a timed repeat dispatches ``calls`` calls back to back and waits for
the last (``block_until_ready``); the first call (compilation) is never timed; the median of the repeats is
reported with every repeat kept. Errors are ``|actual - expected| / |expected|`` in float64 norms, NaN when the
actual value is not finite (NaN never passes a check).
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu.common import DRY_RUN


def attention_fn(name: str):
    """``(q, k, v, segment_ids) -> out`` of attention implementation ``name`` and the name it runs as.

    In the dry run the GPU-only implementations run as their CPU stand-ins: ``pallas_gpu`` in Pallas's
    interpreter, ``cudnn`` as the same wrapper (mask construction included) through jax's XLA implementation."""
    from pallas_kernels.attention.api import attention

    if DRY_RUN and name == "cudnn":
        from pallas_kernels.attention.cudnn import attention_cudnn

        return functools.partial(attention_cudnn, implementation="xla"), "cudnn wrapper via implementation='xla'"
    ran_as = f"{name}_interpret" if DRY_RUN and name == "pallas_gpu" else name
    return (lambda q, k, v, segment_ids: attention(q, k, v, segment_ids, implementation=ran_as)), ran_as


def cross_entropy_fn(name: str):
    """``(hidden, weight, targets, loss_mask) -> CrossEntropyResult`` of ``name`` and the name it runs as."""
    from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy

    ran_as = f"{name}_interpret" if DRY_RUN and name == "pallas_gpu" else name
    return (lambda h, w, t, m: fused_linear_cross_entropy(h, w, t, m, implementation=ran_as)), ran_as


def run_as(name: str | None) -> str | None:
    """The implementation name a train step is configured with (interpret mode in the dry run)."""
    if DRY_RUN and name in ("pallas_gpu", "cudnn"):
        return {"pallas_gpu": "pallas_gpu_interpret", "cudnn": "reference"}[name]
    return name


def time_calls(fn, args, *, repeats: int, calls: int = 1) -> tuple[float, list[float]]:
    """(median ms per call, per-repeat ms per call) after one untimed call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) * 1e3 / calls)
        del out
    return statistics.median(times), [round(t, 4) for t in times]


def relative_error(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape} != reference shape {expected.shape}")
    if not np.all(np.isfinite(actual)):
        return float("nan")
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def within(errors: list[float], tolerance: float) -> bool:
    return all(np.isfinite(e) and e <= tolerance for e in errors)


def compiled_memory(compiled) -> dict | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return {"temp_bytes": int(analysis.temp_size_in_bytes), "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes)}


def compiled_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled program, where the backend gives one."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def packed_segments(batch: int, length: int, seed: int) -> np.ndarray:
    """Rows of several examples of random length (1/8 to 1/2 of the row) and a padded tail, like the packer's."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, length), np.int32)
    for row in range(batch):
        position, segment = 0, 1
        while position < length * 0.95:
            size = int(min(rng.integers(length // 8, length // 2), length * 0.95 - position)) + 1
            segments[row, position:position + size] = segment
            position += size
            segment += 1
    return segments


def visible_pairs(segments: np.ndarray) -> int:
    """(query, key) pairs a causal segment mask lets through: n(n+1)/2 per segment (padding included)."""
    total = 0
    for row in segments:
        _, counts = np.unique(row, return_counts=True)
        total += int(np.sum(counts * (counts + 1) // 2))
    return total


def random_normal(seed: int, shape, dtype, scale: float = 1.0):
    return (jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * scale).astype(dtype)


def device_record() -> dict:
    device = jax.devices()[0]
    record = {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count()}
    try:
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            record["memory_bytes_limit"] = int(stats["bytes_limit"])
    except Exception:  # noqa: BLE001
        pass
    return record


def peak_memory_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        return None
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def matmul_ceiling(size: int, repeats: int, dtype=jnp.bfloat16) -> dict:
    """FLOP/s of a [size, size] @ [size, size] product through XLA on random data, two input sets alternated."""
    pairs = [(random_normal(2 * i, (size, size), dtype), random_normal(2 * i + 1, (size, size), dtype))
             for i in range(2)]
    product = jax.jit(lambda a, b: a @ b)

    def both(a0, b0, a1, b1):
        return product(a0, b0), product(a1, b1)

    median_ms, times = time_calls(both, (*pairs[0], *pairs[1]), repeats=repeats, calls=5)
    flops = 2 * 2 * size ** 3  # two products per call
    return {"size": size, "dtype": jnp.dtype(dtype).name, "median_ms_per_product": median_ms / 2,
            "tflops": flops / (median_ms * 1e-3) / 1e12, "best_tflops": flops / (min(times) * 1e-3) / 1e12}


def copy_ceiling(nbytes: int, repeats: int) -> dict:
    """Bytes/s of an elementwise pass over ``nbytes`` of bf16 (each byte read once and written once)."""
    x = random_normal(7, (nbytes // 2,), jnp.bfloat16)
    add_one = jax.jit(lambda a: a + jnp.ones((), a.dtype))
    median_ms, times = time_calls(add_one, (x,), repeats=repeats, calls=5)
    moved = 2 * x.size * 2
    return {"bytes": int(x.size * 2), "median_ms": median_ms, "tb_per_s": moved / (median_ms * 1e-3) / 1e12,
            "best_tb_per_s": moved / (min(times) * 1e-3) / 1e12}
