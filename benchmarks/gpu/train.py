"""Stage ``train``: whole train steps as ``sftjax train`` builds them, with MFU.

Each case (``Plan.train_cases`` x ``Plan.train_implementations``, the automatic kernels first) is a random-init
run described by a :class:`~sftjax.config.Config` (``model.init``: the model's config.json values) and built by
:func:`sftjax.train.program.build_program`, the recipe the trainer uses: scan over layers, full remat, bf16
compute, AdamW. A Llama-3.2-1B-shaped full fine-tune keeps float32 master weights (8 x 4096 tokens); a
Llama-3.1-8B-shaped LoRA (r=16, all linear layers) keeps a bf16 base (2 x 4096 tokens).

The step is compiled ahead once (lower, then compile: both timed, XLA's memory and FLOP analysis recorded) and
that executable is timed: warm-up steps, then the median of device-synchronized steps on one packed batch.
MFU = model FLOPs (``sftjax.train.flops``: 6N per token for full fine-tuning, attention included, remat not
counted) per second over the datasheet peak, and over the bf16 matmul rate measured at the stage's start.
A case fails its check when a loss or gradient norm is not finite, a step was skipped, or the first loss is
not within 1 of log(vocab) (what a random init gives).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

from benchmarks.gpu.common import Recorder, block_modules


def config_for(case, attention: str, cross_entropy: str, steps: int):
    """The run's Config, built in Python exactly as a YAML file would give it."""
    from benchmarks.gpu import shapes
    from benchmarks.gpu.common_jax import run_as
    from sftjax.config import Config, LoraSection, ModelSection, OptimSection, TrainSection

    model = ModelSection(init=dict(case.model, max_position_embeddings=max(case.length,
                                                                           case.model["max_position_embeddings"])),
                         param_dtype=case.param_dtype, compute_dtype=case.compute_dtype, remat=case.remat,
                         scan_layers=case.scan_layers, attention_implementation=run_as(attention),
                         cross_entropy_implementation=run_as(cross_entropy))
    lora = (LoraSection(enabled=True, r=case.lora_rank, alpha=2.0 * case.lora_rank, dropout=0.0,
                        target_modules="all-linear") if case.lora_rank else LoraSection())
    optim = OptimSection(name="adamw", learning_rate=shapes.LEARNING_RATE, schedule="constant",
                         weight_decay=shapes.WEIGHT_DECAY, max_grad_norm=1.0)
    train = TrainSection(steps=steps, global_batch_size=case.rows, seed=0, progress=False, tensorboard=False)
    return Config(model=model, lora=lora, optim=optim, train=train)


def run_case(case, attention: str, cross_entropy: str, ceiling_flops: float | None) -> dict:
    import jax
    import numpy as np

    from benchmarks.batches import packed_batch
    from benchmarks.gpu import common_jax as cj
    from benchmarks.gpu import shapes
    from pallas_kernels import dispatch
    from pallas_kernels.attention import api as attention_api
    from pallas_kernels.cross_entropy import api as ce_api
    from sftjax.sharding import make_mesh
    from sftjax.train import flops as flops_lib
    from sftjax.train.program import build_program

    steps = shapes.PLAN.train_warmup + shapes.PLAN.train_steps
    cfg = config_for(case, attention, cross_entropy, steps)
    start = time.perf_counter()
    program = build_program(cfg, mesh=make_mesh(), total_steps=steps)
    build_s = time.perf_counter() - start
    host = packed_batch(case.rows, case.length, case.model["vocab_size"], seed=0)
    batch = {k: jax.device_put(v.reshape(1, case.rows, case.length), program.batch_sharding) for k, v in host.items()}
    rng = jax.random.key(0)
    state, frozen = program.state, program.frozen

    start = time.perf_counter()
    lowered = program.train_step.lower(state, frozen, batch, rng)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    del lowered

    losses, grad_norms, skipped, times = [], [], 0, []
    for step in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, jax.random.fold_in(rng, step))
        metrics = jax.device_get(metrics)  # waits for the step
        elapsed = time.perf_counter() - start
        if step >= shapes.PLAN.train_warmup:
            times.append(elapsed)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
        skipped += int(metrics["skipped"])
    step_s = statistics.median(times)

    tokens = case.tokens
    per_token = flops_lib.model_flops_per_token(program.model_config, num_params=program.num_params,
                                                num_trainable_params=program.num_trainable, seq_len=case.length)
    model_flops = per_token * tokens / step_s
    peak = flops_lib.device_peak_flops()
    finite = bool(np.all(np.isfinite(losses)) and np.all(np.isfinite(grad_norms)))
    log_vocab = float(np.log(case.model["vocab_size"]))  # a random init's loss is close to it
    backend = dispatch.backend()
    result = {
        "attention_resolved": (attention_api.automatic_implementation(backend, case.length)[0]
                               if attention == "auto" else cj.run_as(attention)),
        "cross_entropy_resolved": (ce_api.automatic_implementation(backend, tokens * case.model["vocab_size"])[0]
                                   if cross_entropy == "auto" else cj.run_as(cross_entropy)),
        "parameters": program.num_params, "trainable": program.num_trainable,
        "build_s": round(build_s, 2), "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
        "compiled_memory": cj.compiled_memory(compiled), "xla_flops_per_step": cj.compiled_flops(compiled),
        "model_flops_per_step": per_token * tokens, "step_s": step_s, "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s": tokens / step_s, "model_tflops": model_flops / 1e12,
        "peak_flops_datasheet": peak, "mfu_datasheet": model_flops / peak if peak else None,
        "matmul_ceiling_flops": ceiling_flops, "mfu_measured_ceiling": model_flops / ceiling_flops if ceiling_flops
        else None, "losses": losses, "grad_norms": grad_norms, "skipped_steps": skipped,
        "process_peak_memory_bytes": cj.peak_memory_bytes(),
        "log_vocab": log_vocab,
        "status": "ok" if finite and skipped == 0 and abs(losses[0] - log_vocab) < 1.0 else "fail",
    }
    del state, frozen, compiled, program, batch
    gc.collect()
    return result


def main() -> int:
    block_modules()
    from benchmarks.gpu import common_jax as cj
    from benchmarks.gpu import shapes

    record = Recorder("train.jsonl", "train")
    ceiling = record.attempt({"kind": "ceiling", "framework": "jax", "op": "matmul"},
                             lambda: cj.matmul_ceiling(shapes.PLAN.matmul_size, shapes.PLAN.ceiling_repeats), needs_s=5)
    ceiling_flops = ceiling["tflops"] * 1e12 if ceiling.get("status") == "ok" else None
    for attention, cross_entropy in shapes.PLAN.train_implementations:
        for case in shapes.PLAN.train_cases:
            base = {"kind": "train_step", "case": case.name, "attention": attention, "cross_entropy": cross_entropy,
                    "rows": case.rows, "length": case.length, "tokens_per_step": case.tokens,
                    "lora_rank": case.lora_rank, "param_dtype": case.param_dtype,
                    "compute_dtype": case.compute_dtype, "remat": case.remat, "scan_layers": case.scan_layers,
                    "model": case.model}
            record.attempt(base, lambda case=case, a=attention, c=cross_entropy: run_case(case, a, c, ceiling_flops),
                           needs_s=case.needs_s)
            gc.collect()
    return record.finish()


if __name__ == "__main__":
    sys.exit(main())
