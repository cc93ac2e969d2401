"""Compile time of the train step with and without scan over layers (``model.scan_layers``), by depth.

For each depth, a random Llama-style model (hidden 128, 4 heads / 2 KV heads, MLP 256, vocab 4096) gets one
full fine-tuning train step (AdamW, remat full, 2 rows x 256 packed tokens), built by
``sftjax.train.program.build_program`` from a random-init Config (``model.init``), as ``sftjax train`` builds it:
the time to trace + lower, the time to compile (medians of ``--repeats`` interleaved rounds), the size of the optimized HLO, and one step's loss (the two
layouts must agree: the script exits 1 if they differ by more than 1e-5 relative). Compile time depends on the
program, not the sizes of the arrays, so a small width shows what a deep model costs. Writes
``benchmarks/results/compile_<device>.json``.

    python benchmarks/bench_compile.py [--layers 4 16 32] [--repeats 3] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

import jax

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sftjax.config import Config, ModelSection, OptimSection, TrainSection  # noqa: E402
from sftjax.sharding import make_mesh  # noqa: E402
from sftjax.train.program import build_program  # noqa: E402

ROWS, LENGTH, VOCAB = 2, 256, 4096


def batch(sharding) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (ROWS, LENGTH)).astype(np.int32)
    half = LENGTH // 2
    segment_ids = np.concatenate([np.ones((ROWS, half)), 2 * np.ones((ROWS, LENGTH - half))], 1).astype(np.int32)
    positions = np.concatenate([np.arange(half), np.arange(LENGTH - half)])[None].repeat(ROWS, 0).astype(np.int32)
    targets = np.roll(tokens, -1, 1)
    loss_mask = np.ones_like(tokens)
    loss_mask[:, half - 1] = loss_mask[:, -1] = 0
    arrays = dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)
    return {k: jax.device_put(v.reshape(1, ROWS, LENGTH), sharding) for k, v in arrays.items()}


def config(num_layers: int, scan: bool) -> Config:
    """The run: random init (``model.init``), full fine-tuning, AdamW (lr 1e-3, 10-step cosine), clipping at 1."""
    init = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_layers=num_layers, num_heads=4,
                num_kv_heads=2, head_dim=32, max_position_embeddings=LENGTH)
    return Config(model=ModelSection(init=init, remat="full", scan_layers=scan),
                  optim=OptimSection(learning_rate=1e-3, max_grad_norm=1.0),
                  train=TrainSection(steps=10, global_batch_size=ROWS, seed=0, progress=False, tensorboard=False))


def measure(num_layers: int, scan: bool) -> dict:
    program = build_program(config(num_layers, scan), mesh=make_mesh(), total_steps=10)
    state, frozen, step = program.state, program.frozen, program.train_step
    data = batch(program.batch_sharding)
    key = jax.random.key(0)
    start = time.perf_counter()
    lowered = step.lower(state, frozen, data, key)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    hlo_chars = len(compiled.as_text())
    _, metrics = compiled(state, frozen, data, key)
    return {"layers": num_layers, "scan_layers": scan, "trace_and_lower_s": round(lower_s, 3),
            "compile_s": round(compile_s, 3), "optimized_hlo_chars": hlo_chars, "loss": float(metrics["loss"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=pathlib.Path)
    args = parser.parse_args()
    device = jax.devices()[0].platform
    out = args.output or REPO / "benchmarks" / "results" / f"compile_{device}.json"
    load_before = os.getloadavg()
    measure(2, False)  # warm-up: first-use costs of jax/XLA are nobody's compile time
    runs, failed = [], False
    for repeat in range(args.repeats):  # interleaved rounds: load changes on a shared machine hit all alike
        for layers in args.layers:
            for scan in (False, True):
                result = {**measure(layers, scan), "round": repeat}
                runs.append(result)
                print(json.dumps(result), flush=True)
    summary = []
    for layers in args.layers:
        plain = [r for r in runs if r["layers"] == layers and not r["scan_layers"]]
        scanned = [r for r in runs if r["layers"] == layers and r["scan_layers"]]
        losses = {r["loss"] for r in plain}, {r["loss"] for r in scanned}
        relative = abs(min(losses[1]) - min(losses[0])) / abs(min(losses[0]))
        if relative > 1e-5:
            print(f"FAIL: {layers} layers: scanned loss {losses[1]} != unscanned {losses[0]}")
            failed = True
        total = [float(np.median([r["trace_and_lower_s"] + r["compile_s"] for r in group])) for group in (plain, scanned)]
        summary.append({"layers": layers, "median_total_s_unscanned": round(total[0], 2),
                        "median_total_s_scanned": round(total[1], 2), "speedup": round(total[0] / total[1], 2),
                        "hlo_chars_unscanned": plain[0]["optimized_hlo_chars"],
                        "hlo_chars_scanned": scanned[0]["optimized_hlo_chars"], "loss_relative_difference": relative})
    record = {"device": device, "jax": jax.__version__, "python": platform.python_version(),
              "cpus": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "model": {"hidden": 128, "mlp": 256, "heads": 4, "kv_heads": 2, "vocab": VOCAB, "remat": "full"},
              "batch": {"rows": ROWS, "length": LENGTH}, "runs": runs, "summary": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
