"""One full fine-tuning optimizer step of a small mixture-of-experts model, sftjax vs the plain PyTorch loop
(transformers' Qwen3-MoE and Mixtral), on the same weights and the same packed batch.

The loop and the measurement are those of ``benchmarks/bench_train_step.py`` (whose runners this script reuses):
PyTorch runs the transformers model eagerly with a 4D block-diagonal causal mask, masked-mean cross-entropy and
``torch.optim.AdamW``, with the experts implementation transformers picks by default (recorded: ``grouped_mm``
where torch has it, else its per-expert loop); sftjax runs the jitted step ``sftjax train`` builds, with the
grouped-matmul (``ragged_dot``) experts and with the dense-einsum oracle. The router's load-balancing loss is off
in both (``router_aux_loss_coef = 0``), so the two objectives are the same cross-entropy and the first step's
loss and gradient norm must agree (relative 1e-5, else exit 1). Step times are medians of interleaved rounds in
one process (every configuration once per round), so machine load hits them alike; compare ratios.

    python benchmarks/bench_moe_train_step.py            # ~5 min on 2 cores
    python benchmarks/bench_moe_train_step.py --quick    # one model, fewer rounds
Writes ``benchmarks/results/moe_train_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.bench_moe import cpu_model  # noqa: E402
from benchmarks.bench_train_step import (  # noqa: E402
    GRAD_NORM_RTOL,
    LOSS_RTOL,
    interleaved_medians,
    sftjax_runner,
    torch_runner,
)
from benchmarks.batches import packed_batch  # noqa: E402

COMMON = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=False, router_aux_loss_coef=0.0,
              output_router_logits=False)
MODELS = {
    # 16 experts, 4 active: ~22M parameters, ~8M active per token
    "qwen3_moe_16x4": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=512, moe_intermediate_size=256,
                                              num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)),
    # 8 experts, 2 active, Mixtral's layout
    "mixtral_8x2": ("MixtralConfig", dict(COMMON, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2)),
}


def hf_moe(name: str, length: int, seed: int = 0):
    config_class, kwargs = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**kwargs, max_position_embeddings=length)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    return model


def bench(name: str, rows: int, length: int, warmup: int, repeats: int) -> dict:
    hf = hf_moe(name, length)
    directory = tempfile.TemporaryDirectory(prefix=f"bench_{name}_")
    hf.save_pretrained(directory.name)
    batch = packed_batch(rows, length, MODELS[name][1]["vocab_size"])
    record = {"model": name, "config": MODELS[name][1],
              "parameters": int(sum(p.numel() for p in hf.parameters())),
              "torch_experts_implementation": getattr(hf.config, "_experts_implementation_internal", None)
              or getattr(hf.config, "_experts_implementation", None),
              "batch": {"rows": rows, "max_length": length, "tokens_per_step": rows * length,
                        "trained_tokens": int(batch["loss_mask"].sum())},
              "warmup_rounds": warmup, "timed_rounds": repeats, "results": []}
    torch_step, _ = torch_runner(hf, batch)
    torch_loss, torch_norm = torch_step(with_grad_norm=True)
    steps = {"pytorch": torch_step}
    print(f"[{name}] pytorch ({record['torch_experts_implementation']}): loss {torch_loss:.6f} "
          f"grad norm {torch_norm:.6f}", flush=True)
    for implementation in ("ragged_dot", "dense"):
        step, _, memory = sftjax_runner(directory.name, batch, "auto", "auto", moe_implementation=implementation)
        start = time.perf_counter()
        loss, norm = step(with_grad_norm=True)
        first = time.perf_counter() - start
        result = {"experts": implementation, "first_step_loss": loss,
                  "loss_rel_diff_vs_pytorch": abs(loss - torch_loss) / abs(torch_loss),
                  "grad_norm_rel_diff_vs_pytorch": abs(norm - torch_norm) / abs(torch_norm),
                  "first_call_s": first, "compiled_memory": memory}
        record["results"].append(result)
        steps[f"sftjax/{implementation}"] = step
        print(f"[{name}] sftjax {implementation}: loss rel diff {result['loss_rel_diff_vs_pytorch']:.1e}, grad "
              f"norm rel diff {result['grad_norm_rel_diff_vs_pytorch']:.1e}", flush=True)
    times = interleaved_medians(steps, max(warmup - 1, 0), repeats)
    torch_median = statistics.median(times["pytorch"])
    record["pytorch"] = {"first_step_loss": torch_loss, "first_step_grad_norm": torch_norm, "median_s": torch_median,
                         "times_s": times["pytorch"], "threads": torch.get_num_threads()}
    for result in record["results"]:
        median = statistics.median(times[f"sftjax/{result['experts']}"])
        result.update(median_s=median, times_s=times[f"sftjax/{result['experts']}"],
                      speedup_vs_pytorch=torch_median / median)
        print(f"[{name}] sftjax {result['experts']}: median {median * 1e3:.0f} ms vs pytorch "
              f"{torch_median * 1e3:.0f} ms: x{torch_median / median:.2f}", flush=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=pathlib.Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    names = ["qwen3_moe_16x4"] if args.quick else list(MODELS)
    steps = args.steps or (3 if args.quick else 7)
    started, load_before = time.perf_counter(), os.getloadavg()
    records = [bench(name, args.rows, args.length, args.warmup, steps) for name in names]
    backend = jax.default_backend()
    report = {"device": backend, "cpu_model": cpu_model(), "cpus": os.cpu_count(),
              "machine": platform.platform(),
              "versions": {"jax": jax.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "numpy": np.__version__},
              "dtype": "float32", "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "wall_seconds": round(time.perf_counter() - started, 1), "models": records,
              "note": "medians of interleaved rounds in one process; compare ratios (shared CPU)"}
    output = args.output or REPO / "benchmarks" / "results" / f"moe_train_step_{backend}.json"
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}")
    bad = [r for m in records for r in m["results"]
           if not (r["loss_rel_diff_vs_pytorch"] < LOSS_RTOL and r["grad_norm_rel_diff_vs_pytorch"] < GRAD_NORM_RTOL)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
