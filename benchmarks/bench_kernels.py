"""Correctness and speed of every available attention and fused-CE implementation at realistic shapes.

For each implementation: relative error of the output and gradients against the reference (on the same
inputs; the reference computes in float32), median wall time of the forward and of forward+backward over
repeated runs after a warm-up (``block_until_ready``), and XLA's compiled memory (temporaries + arguments +
outputs) of forward+backward. A failing implementation is recorded with its error instead of stopping the run.
Writes ``benchmarks/results/kernels_<device>.json``.

    python benchmarks/bench_kernels.py            # accelerator shapes (GPU/TPU; a few minutes)
    python benchmarks/bench_kernels.py --small    # CPU-sized shapes (under a minute)

On a GPU machine use ``scripts/bench_gpu.sh`` instead (``benchmarks/gpu/``: capped stages, float32 checks under
"highest" matmul precision, results appended as they arrive).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pallas_kernels.attention.api import attention  # noqa: E402
from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy  # noqa: E402

ATTENTION_IMPLEMENTATIONS = {
    "cpu": ["reference", "xla_chunked"],
    "gpu": ["reference", "xla_chunked", "pallas_gpu", "cudnn"],
    "tpu": ["reference", "xla_chunked", "splash_tpu"],
}
CE_IMPLEMENTATIONS = {
    "cpu": ["reference", "xla_chunked"],
    "gpu": ["reference", "xla_chunked", "pallas_gpu"],
    "tpu": ["reference", "xla_chunked", "pallas_tpu"],
}


def backend_name():
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def relative_error(actual, expected):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    if not np.all(np.isfinite(actual)):
        return float("nan")
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def compiled_bytes(fn, args):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)


def short_error(error):
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text[:500]


def packed_segments(batch, length, seed):
    """Rows of several examples of random length and a padded tail, like the packer produces."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, length), np.int32)
    for row in range(batch):
        position, segment = 0, 1
        while position < length * 0.95:
            size = int(min(rng.integers(length // 8, length // 2), length * 0.95 - position)) + 1
            segments[row, position:position + size] = segment
            position += size
            segment += 1
    return jnp.asarray(segments)


def bench_attention(implementations, shape, dtype, repeats, seed=0):
    batch, length, num_q_heads, num_kv_heads, head_dim = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, num_q_heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    segments = packed_segments(batch, length, seed)
    causal_flops = 4 * batch * num_q_heads * length * length * head_dim / 2

    def make(name):
        def forward(q, k, v, segments):
            return attention(q, k, v, segments, implementation=name)

        def forward_backward(q, k, v, segments, d_out):
            out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, segments), q, k, v)
            return out, vjp(d_out)

        return jax.jit(forward), jax.jit(forward_backward)

    reference_out = reference_grads = None
    results = []
    for name in implementations:
        record = {"op": "attention", "implementation": name, "dtype": jnp.dtype(dtype).name,
                  "shape": dict(batch=batch, length=length, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, segments=int(segments.max()))}
        try:
            forward, forward_backward = make(name)
            out, grads = forward_backward(q, k, v, segments, d_out)
            jax.block_until_ready(grads)
            if name == "reference":
                reference_out, reference_grads = out, grads
            elif reference_out is not None:
                record["rel_err_out"] = relative_error(out, reference_out)
                record["rel_err_dq_dk_dv"] = [relative_error(a, b) for a, b in zip(grads, reference_grads)]
            del out, grads
            record["forward_ms"], record["forward_times_ms"] = median_ms(forward, (q, k, v, segments), repeats)
            record["forward_backward_ms"], record["forward_backward_times_ms"] = median_ms(
                forward_backward, (q, k, v, segments, d_out), repeats)
            record["forward_tflops_causal_dense"] = causal_flops / record["forward_ms"] / 1e9
            record["forward_backward_tflops_causal_dense"] = 3.5 * causal_flops / record["forward_backward_ms"] / 1e9
            record["compiled_bytes_forward_backward"] = compiled_bytes(forward_backward,
                                                                       (q, k, v, segments, d_out))
            record["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - a failing kernel is a result to record, not a crash
            record["status"] = "error"
            record["error"] = short_error(error)
            traceback.print_exc(limit=3)
        print(json.dumps({key: value for key, value in record.items() if not key.endswith("times_ms")}), flush=True)
        results.append(record)
    return results


def bench_cross_entropy(implementations, shape, dtype, repeats, seed=0):
    tokens, hidden_dim, vocab = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(keys[0], (tokens, hidden_dim), dtype)
    weight = (jax.random.normal(keys[1], (hidden_dim, vocab), jnp.float32) * hidden_dim ** -0.5).astype(dtype)
    targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
    # Prompt tokens untrained, answers trained: runs of 512 alternate, about half the tokens trained.
    loss_mask = ((jnp.arange(tokens) // 512) % 2).astype(jnp.int32)
    matmul_flops = 2 * tokens * hidden_dim * vocab

    def make(name):
        def forward(hidden, weight, targets, loss_mask):
            return fused_linear_cross_entropy(hidden, weight, targets, loss_mask, implementation=name)

        def forward_backward(hidden, weight, targets, loss_mask):
            return jax.value_and_grad(lambda h, w: forward(h, w, targets, loss_mask).loss_sum, argnums=(0, 1))(
                hidden, weight)

        return jax.jit(forward), jax.jit(forward_backward)

    reference = None
    results = []
    for name in implementations:
        record = {"op": "fused_linear_cross_entropy", "implementation": name, "dtype": jnp.dtype(dtype).name,
                  "shape": dict(tokens=tokens, hidden=hidden_dim, vocab=vocab,
                                trained_tokens=int(loss_mask.sum()))}
        try:
            forward, forward_backward = make(name)
            loss, grads = forward_backward(hidden, weight, targets, loss_mask)
            jax.block_until_ready(grads)
            if name == "reference":
                reference = (loss, grads)
            elif reference is not None:
                record["rel_err_loss"] = relative_error(loss, reference[0])
                record["rel_err_d_hidden_d_weight"] = [relative_error(a, b) for a, b in zip(grads, reference[1])]
            del loss, grads
            args = (hidden, weight, targets, loss_mask)
            record["forward_ms"], record["forward_times_ms"] = median_ms(forward, args, repeats)
            record["forward_backward_ms"], record["forward_backward_times_ms"] = median_ms(forward_backward, args,
                                                                                           repeats)
            record["forward_backward_tflops_all_tokens"] = 3 * matmul_flops / record["forward_backward_ms"] / 1e9
            record["compiled_bytes_forward_backward"] = compiled_bytes(forward_backward, args)
            record["status"] = "ok"
        except Exception as error:  # noqa: BLE001
            record["status"] = "error"
            record["error"] = short_error(error)
            traceback.print_exc(limit=3)
        print(json.dumps({key: value for key, value in record.items() if not key.endswith("times_ms")}), flush=True)
        results.append(record)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes (finishes in under a minute)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", choices=["attention", "cross_entropy"], default=None)
    parser.add_argument("--output", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    backend = backend_name()
    device = jax.devices()[0]
    device_name = re.sub(r"[^A-Za-z0-9]+", "_", device.device_kind if backend != "cpu" else "cpu").strip("_")
    if args.small:
        attention_shapes = [(1, 1024, 8, 2, 64)]
        ce_shapes = [(1024, 128, 16384)]
        dtype = jnp.float32
        repeats = args.repeats or 3
        device_name += "_small"
    else:
        attention_shapes = [(1, 4096, 32, 8, 128), (1, 8192, 32, 8, 128)]
        ce_shapes = [(16384, 4096, 128256)]
        dtype = jnp.bfloat16
        repeats = args.repeats or 5
    started = time.time()
    results = []
    if args.only in (None, "attention"):
        for shape in attention_shapes:
            results += bench_attention(ATTENTION_IMPLEMENTATIONS.get(backend, ["reference"]), shape, dtype, repeats)
    if args.only in (None, "cross_entropy"):
        for shape in ce_shapes:
            results += bench_cross_entropy(CE_IMPLEMENTATIONS.get(backend, ["reference"]), shape, dtype, repeats)
    report = {
        "device": device.device_kind, "backend": backend, "jax_version": jax.__version__,
        "small": args.small, "repeats": repeats, "wall_seconds": round(time.time() - started, 1),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results,
    }
    output = args.output or REPO / "benchmarks" / "results" / f"kernels_{device_name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output} ({report['wall_seconds']} s)")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
