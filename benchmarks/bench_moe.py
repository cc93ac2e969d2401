"""The MoE block's grouped-matmul path (``ragged_dot``) against the dense-einsum oracle on a small layer.

Per implementation and layer shape: median wall time of forward and of forward+backward (repeats interleaved
between the implementations, after a warm-up), XLA's compiled memory of forward+backward
(``jax.jit(...).lower(...).compile().memory_analysis()``: temporaries, arguments, outputs), and the relative
error of the output and input gradient against the dense oracle on the same inputs. Writes
``benchmarks/results/moe_<backend>.json``.

    python benchmarks/bench_moe.py              # CPU: about a minute
    python benchmarks/bench_moe.py --repeats 9
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sftjax.models.moe import MoE, MoEConfig  # noqa: E402

SHAPES = [
    dict(batch=4, length=512, hidden=256, intermediate=512, experts=8, k=2),
    dict(batch=4, length=512, hidden=256, intermediate=256, experts=32, k=4),
]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def build(shape: dict, implementation: str):
    config = MoEConfig(hidden_size=shape["hidden"], expert_intermediate_size=shape["intermediate"],
                       num_experts=shape["experts"], num_experts_per_tok=shape["k"], implementation=implementation)
    moe = MoE(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(moe)

    def forward(params, x, seg):
        y, aux = nnx.merge(graphdef, params)(x, seg)
        return y, aux

    def loss(params, x, seg, ct):
        y, aux = forward(params, x, seg)
        lb, count = aux.load_balancing()
        return jnp.sum(y * ct) + 0.01 * lb / count

    return params, jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    implementations = ["ragged_dot", "dense"]
    results = []
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        b, l, d = shape["batch"], shape["length"], shape["hidden"]
        x = jnp.asarray(rng.standard_normal((b, l, d)), jnp.float32)
        ct = jnp.asarray(rng.standard_normal((b, l, d)), jnp.float32)
        seg = np.ones((b, l), np.int32)
        seg[:, l // 2:] = 2
        seg[-1, -l // 8:] = 0
        seg = jnp.asarray(seg)
        built = {impl: build(shape, impl) for impl in implementations}
        rows = {impl: {"implementation": impl, "shape": shape, "forward_times_ms": [],
                       "forward_backward_times_ms": []} for impl in implementations}
        outputs = {}
        for impl, (params, fwd, fwd_bwd) in built.items():
            compiled = fwd_bwd.lower(params, x, seg, ct).compile()
            memory = compiled.memory_analysis()
            rows[impl]["compiled_bytes_forward_backward"] = int(memory.temp_size_in_bytes
                                                                + memory.argument_size_in_bytes
                                                                + memory.output_size_in_bytes)
            rows[impl]["compiled_temp_bytes_forward_backward"] = int(memory.temp_size_in_bytes)
            forward_memory = fwd.lower(params, x, seg).compile().memory_analysis()
            rows[impl]["compiled_temp_bytes_forward"] = int(forward_memory.temp_size_in_bytes)
            jax.block_until_ready(fwd(params, x, seg))
            outputs[impl] = (fwd(params, x, seg)[0], jax.block_until_ready(fwd_bwd(params, x, seg, ct))[1][1])
        for _ in range(args.repeats):  # interleaved: a load spike hits every implementation alike
            for impl, (params, fwd, fwd_bwd) in built.items():
                t = time.perf_counter()
                jax.block_until_ready(fwd(params, x, seg))
                rows[impl]["forward_times_ms"].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                jax.block_until_ready(fwd_bwd(params, x, seg, ct))
                rows[impl]["forward_backward_times_ms"].append((time.perf_counter() - t) * 1e3)
        for impl in implementations:
            row = rows[impl]
            row["forward_ms"] = statistics.median(row["forward_times_ms"])
            row["forward_backward_ms"] = statistics.median(row["forward_backward_times_ms"])
            y, gx = outputs[impl]
            y_ref, gx_ref = outputs["dense"]
            row["rel_err_out_vs_dense"] = float(jnp.max(jnp.abs(y - y_ref)) / jnp.max(jnp.abs(y_ref)))
            row["rel_err_dx_vs_dense"] = float(jnp.max(jnp.abs(gx - gx_ref)) / jnp.max(jnp.abs(gx_ref)))
            results.append(row)
            print(f"{impl:>10} E={shape['experts']:>2} k={shape['k']} F={shape['intermediate']}: "
                  f"fwd {row['forward_ms']:.1f} ms, fwd+bwd {row['forward_backward_ms']:.1f} ms, "
                  f"compiled fwd+bwd {row['compiled_bytes_forward_backward'] / 2**20:.1f} MiB "
                  f"(temp {row['compiled_temp_bytes_forward_backward'] / 2**20:.1f} MiB)", flush=True)
    backend = jax.default_backend()
    record = {"backend": backend, "cpu_model": cpu_model(), "jax_version": jax.__version__,
              "devices": jax.device_count(), "dtype": "float32", "repeats": args.repeats,
              "wall_seconds": round(time.perf_counter() - started, 1),
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "results": results}
    out = pathlib.Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"moe_{backend}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
