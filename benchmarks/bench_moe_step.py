"""A small MoE model's full train step: sftjax (jitted step, ragged_dot experts) against transformers' Mixtral and
Qwen3-MoE in a plain PyTorch loop (forward with labels and output_router_logits=True so the aux loss is in the loss,
backward, AdamW step), on the same weights and the same batches, CPU, float32; sftjax once per MoE implementation (``ragged_dot``, the
grouped path, and ``dense``, every token through every expert), transformers with its default experts kernel.

Per family: median step time of each side (steps interleaved between the two, after warm-up steps), tokens per
second, and the first step's loss of both (they must agree: same weights, same batch, same objective with
router_aux_loss_coef). Every row is one example of ``--length`` tokens (no padding), so causal attention is the
whole mask on both sides. Writes ``benchmarks/results/moe_step_cpu.json``.

    python benchmarks/bench_moe_step.py              # CPU: a few minutes
    python benchmarks/bench_moe_step.py --steps 7 --rows 8 --length 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_moe import cpu_model  # noqa: E402
from sftjax.config import LoraSection, OptimSection  # noqa: E402
from sftjax.models.loading import load_model  # noqa: E402
from sftjax.peft.lora import split_model  # noqa: E402
from sftjax.train.optim import make_optimizer  # noqa: E402
from sftjax.train.step import LossOptions, TrainState, make_train_step  # noqa: E402

COMMON = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              head_dim=32, max_position_embeddings=1024, num_experts_per_tok=2, router_aux_loss_coef=0.02,
              output_router_logits=True, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(COMMON, intermediate_size=512, num_local_experts=8)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(COMMON, intermediate_size=1024,
                                                                moe_intermediate_size=512, num_experts=8,
                                                                norm_topk_prob=True)),
}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _batches(count, rows, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tokens = rng.integers(3, vocab, (rows, length)).astype(np.int32)
        targets = np.zeros_like(tokens)
        targets[:, :-1] = tokens[:, 1:]
        mask = np.ones_like(tokens)
        mask[:, -1] = 0
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
        out.append({"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": np.ones_like(tokens),
                    "positions": positions})
    return out


def bench_family(name, args, implementation):
    import torch
    import transformers

    config_class, model_class, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).float().train()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        model, config = load_model(directory, dtype=jnp.float32)
    model.configure(moe={"implementation": implementation})
    lr = 1e-4
    graphdef, trainable, frozen = split_model(model, LoraSection())
    tx, schedule = make_optimizer(OptimSection(name="adamw", learning_rate=lr, schedule="constant",
                                               max_grad_norm=None, no_decay=[]), 1000)
    step = make_train_step(graphdef, tx, schedule, LossOptions(router_aux_loss_coef=config.moe.router_aux_loss_coef),
                           donate=True)
    state = TrainState.create(trainable, tx)
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.0, eps=1e-8)
    batches = _batches(args.warmup + args.steps, args.rows, args.length, kwargs["vocab_size"])

    def ours(batch):
        nonlocal state
        t = time.perf_counter()
        state, metrics = step(state, frozen, {k: jnp.asarray(v)[None] for k, v in batch.items()}, jax.random.key(0))
        loss = float(metrics["loss"]) + config.moe.router_aux_loss_coef * float(metrics["router_aux_loss"])
        return time.perf_counter() - t, loss

    def theirs(batch):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        tokens = torch.tensor(batch["tokens"], dtype=torch.long)
        labels = tokens.clone()  # transformers shifts labels itself: the same next-token targets as ours
        out = hf(input_ids=tokens, labels=labels, use_cache=False)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t, float(out.loss.detach())

    times = {"sftjax": [], "transformers": []}
    first = {}
    for index, batch in enumerate(batches):
        for side, run in (("sftjax", ours), ("transformers", theirs)):
            elapsed, loss = run(batch)
            if index == 0:
                first[side] = loss
            if index >= args.warmup:
                times[side].append(elapsed)
    tokens = args.rows * args.length
    row = {"family": name, "implementation": implementation, "rows": args.rows, "length": args.length, "config": kwargs,
           "transformers_experts_implementation": getattr(hf.config, "_experts_implementation", None),
           "transformers_attn_implementation": hf.config._attn_implementation,
           "first_step_loss": first, "step_times_s": times}
    for side in times:
        median = statistics.median(times[side])
        row[f"{side}_median_step_s"] = median
        row[f"{side}_tokens_per_s"] = tokens / median
    row["speedup_sftjax_over_transformers"] = row["transformers_median_step_s"] / row["sftjax_median_step_s"]
    print(f"{name} ({implementation}): sftjax {row['sftjax_median_step_s'] * 1e3:.0f} ms/step, transformers "
          f"{row['transformers_median_step_s'] * 1e3:.0f} ms/step (x{row['speedup_sftjax_over_transformers']:.2f}); "
          f"first loss {first['sftjax']:.5f} vs {first['transformers']:.5f}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--implementations", default="ragged_dot,dense", help="sftjax MoE implementations to time")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "moe_step_cpu.json"))
    args = parser.parse_args()
    import torch

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results = [bench_family(name, args, implementation) for name in args.families.split(",")
               for implementation in args.implementations.split(",")]
    record = {"backend": jax.default_backend(), "cpu_model": cpu_model(), "cores": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "jax_version": jax.__version__,
              "torch_version": torch.__version__, "commit": _git_commit(), "dtype": "float32",
              "steps": args.steps, "warmup": args.warmup, "wall_seconds": round(time.perf_counter() - started, 1),
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "results": results}
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
