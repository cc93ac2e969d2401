"""One full fine-tuning optimizer step, sftjax vs the plain PyTorch loop, on the same weights and the same batch.

What is measured (float32, CPU unless JAX/torch see an accelerator):

* PyTorch baseline, the loop DESIGN.md names: a ``transformers`` Llama run eagerly on rows of ``max_length``
  with a 4D block-diagonal causal mask per row (``use_cache=False``, per-segment position ids), masked-mean
  cross-entropy over the trained tokens, ``torch.optim.AdamW``; torch threads = the machine's cores.
* sftjax: the run ``sftjax train`` would build (``sftjax.train.program.build_program`` from a Config made in
  Python, the model loaded from the PyTorch model's own ``save_pretrained`` directory; forward + backward + optax
  AdamW, jitted, state donated) with every attention / cross-entropy implementation pair that runs on the CPU,
  plus the automatic choice.

Correctness first: the first step's loss and gradient global norm of every sftjax configuration are compared
with PyTorch's (relative differences printed and recorded; the script exits 1 above 1e-5). At a fresh init the
loss is close to log(vocab) whatever the weights, so the gradient norm is the sharper of the two checks. Then
each configuration runs warm-up steps (compilation excluded) and the MEDIAN wall time of N device-synchronized
steps; tokens/s count every position of the [rows, L] batch (padding included, as both frameworks compute it).
All configurations live in ONE process and are timed in interleaved rounds (one step of each per round), so a
change of load on a shared machine hits all of them alike and the ratios sftjax / PyTorch stay comparable; the
load average is recorded before and after.
``--profile`` also times the forward pass alone (loss only) per configuration, to split forward from backward.

    python benchmarks/bench_train_step.py --quick      # ~1 min: 7M model, 2 rows, 5 timed rounds
    python benchmarks/bench_train_step.py              # 7M and 32M models, 4 rows, 10 timed rounds
Writes ``benchmarks/results/train_step_<device>.json`` (``--output`` to override).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.batches import packed_batch  # noqa: E402,F401 - re-exported for profile_train_step
from sftjax.config import Config, ModelSection, OptimSection, TrainSection  # noqa: E402
from sftjax.sharding import make_mesh  # noqa: E402
from sftjax.train.program import build_program  # noqa: E402
from sftjax.train.step import forward_loss  # noqa: E402

MODELS = {
    # ~7M parameters: the shape DESIGN.md's "Where the time goes" refers to
    "llama_7m": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    # ~32M parameters
    "llama_32m": dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64),
}
# (attention, cross_entropy) implementations that run on the CPU; "auto" = implementation=None
CONFIGURATIONS = [("reference", "reference"), ("xla_chunked", "xla_chunked"), ("auto", "auto")]
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.1
# the first step must agree with PyTorch: loss (same weights, same batch) and the gradient's global norm
LOSS_RTOL, GRAD_NORM_RTOL = 1e-5, 1e-5


def hf_llama(spec: dict, max_length: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**spec, max_position_embeddings=max_length, rms_norm_eps=1e-6,
                                      rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                                      mlp_bias=False, attn_implementation="sdpa")
    config.architectures = ["LlamaForCausalLM"]
    return transformers.LlamaForCausalLM(config).float()


# ----------------------------------------------------------------------------------------------------- PyTorch
def torch_block_causal_mask(segment_ids: np.ndarray) -> torch.Tensor:
    """[B, 1, L, L] additive float mask: 0 where token i may see token j (same segment, j <= i), else -inf.
    Padding (segment 0) sees earlier padding only, so no row of the softmax is empty."""
    seg = torch.as_tensor(segment_ids, dtype=torch.long)
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


def torch_runner(model, batch: dict[str, np.ndarray]):
    inputs = dict(input_ids=torch.as_tensor(batch["tokens"], dtype=torch.long),
                  position_ids=torch.as_tensor(batch["positions"], dtype=torch.long),
                  attention_mask=torch_block_causal_mask(batch["segment_ids"]))
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)
    mask = torch.as_tensor(batch["loss_mask"], dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=WEIGHT_DECAY)

    def loss_fn():
        logits = model(**inputs, use_cache=False).logits.float()
        token_ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return (token_ce * mask.flatten()).sum() / mask.sum().clamp(min=1.0)

    def step(with_grad_norm: bool = False):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grad_norm = None
        if with_grad_norm:  # the global L2 norm of the gradient, before the update, summed in float64:
            # torch's float32 vector_norm of these gradients is off by ~2e-5 relative (7M model), too coarse
            # for a 1e-4 check (the 32M model's float32 norm was off by 8e-5)
            grad_norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in model.parameters()])).item()
        optimizer.step()
        return (loss.item(), grad_norm) if with_grad_norm else loss.item()

    def forward():
        with torch.no_grad():
            return loss_fn().item()

    return step, forward


# ------------------------------------------------------------------------------------------------------ sftjax
def run_config(model_dir: str, rows: int, attention: str, cross_entropy: str) -> Config:
    """The benchmark's run as a Config: full fine-tuning in float32, AdamW at a constant rate, no clipping."""
    return Config(
        model=ModelSection(path=model_dir, param_dtype="float32", compute_dtype="float32",
                           attention_implementation=attention, cross_entropy_implementation=cross_entropy),
        optim=OptimSection(name="adamw", learning_rate=LEARNING_RATE, schedule="constant",
                           weight_decay=WEIGHT_DECAY, no_decay=[], b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=None),
        train=TrainSection(steps=1000, global_batch_size=rows, progress=False, tensorboard=False))


def sftjax_runner(model_dir: str, batch: dict[str, np.ndarray], attention: str, cross_entropy: str):
    """(step() -> loss, forward() -> loss, compiled memory) for one implementation pair, on a fresh model loaded
    from ``model_dir`` by ``build_program`` (the recipe ``sftjax train`` uses)."""
    rows, length = batch["tokens"].shape
    program = build_program(run_config(model_dir, rows, attention, cross_entropy), mesh=make_mesh(),
                            total_steps=1000)
    graphdef, frozen, options, train_step = program.graphdef, program.frozen, program.loss, program.train_step
    device_batch = {k: jax.device_put(v.reshape(1, rows, length), program.batch_sharding) for k, v in batch.items()}
    eval_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rng = jax.random.key(0)
    holder = {"state": program.state}

    compiled = train_step.lower(holder["state"], frozen, device_batch, rng).compile()
    analysis = compiled.memory_analysis()
    memory = None if analysis is None else {
        "temp_bytes": int(analysis.temp_size_in_bytes), "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes)}

    def step(with_grad_norm: bool = False):
        holder["state"], metrics = train_step(holder["state"], frozen, device_batch, rng)
        loss = float(jax.block_until_ready(metrics["loss"]))
        return (loss, float(metrics["grad_norm"])) if with_grad_norm else loss

    @jax.jit
    def loss_only(params, frozen, batch):
        result = forward_loss(graphdef, params, frozen, batch, None, options)
        return result.loss_sum / jnp.maximum(result.token_count, 1.0)

    def forward():
        return float(jax.block_until_ready(loss_only(holder["state"].params, frozen, eval_batch)))

    return step, forward, memory


def interleaved_medians(functions: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Per-call wall times of every function, timed in rounds (each function once per round, in turn), so a
    change of machine load during the run hits every configuration alike; ``warmup`` untimed rounds first."""
    times = {label: [] for label in functions}
    for round_index in range(warmup + repeats):
        for label, fn in functions.items():
            start = time.perf_counter()
            fn()
            if round_index >= warmup:
                times[label].append(time.perf_counter() - start)
    return times


def parameter_count(weights: dict[str, np.ndarray]) -> int:
    return int(sum(w.size for w in weights.values()))


def bench_model(name: str, rows: int, length: int, warmup: int, repeats: int, profile: bool) -> dict:
    spec = MODELS[name]
    hf = hf_llama(spec, length)
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}  # for the parameter count
    model_dir = tempfile.TemporaryDirectory(prefix=f"bench_{name}_")
    hf.save_pretrained(model_dir.name)  # before torch trains: both frameworks start from these weights
    batch = packed_batch(rows, length, spec["vocab_size"])
    tokens_per_step = rows * length
    record = {"model": name, "config": spec, "parameters": parameter_count(weights),
              "batch": {"rows": rows, "max_length": length, "tokens_per_step": tokens_per_step,
                        "non_pad_tokens": int((batch["segment_ids"] > 0).sum()),
                        "trained_tokens": int(batch["loss_mask"].sum()),
                        "segments_per_row": [int(r.max()) for r in batch["segment_ids"]]},
              "warmup_rounds": warmup, "timed_rounds": repeats, "timing": "interleaved rounds", "results": []}

    torch_step, torch_forward = torch_runner(hf, batch)
    torch_first_loss, torch_grad_norm = torch_step(with_grad_norm=True)
    print(f"[{name}] pytorch: first-step loss {torch_first_loss:.6f}  grad norm {torch_grad_norm:.6f}", flush=True)
    steps, forwards = {"pytorch": torch_step}, {"pytorch": torch_forward}
    for attention, cross_entropy in CONFIGURATIONS:
        label = f"{attention}/{cross_entropy}"
        step, forward, memory = sftjax_runner(model_dir.name, batch, attention, cross_entropy)
        start = time.perf_counter()
        first_loss, grad_norm = step(with_grad_norm=True)  # compiles
        compile_s = time.perf_counter() - start
        relative = abs(first_loss - torch_first_loss) / abs(torch_first_loss)
        grad_relative = abs(grad_norm - torch_grad_norm) / abs(torch_grad_norm)
        steps[label], forwards[label] = step, forward
        record["results"].append({"attention": attention, "cross_entropy": cross_entropy,
                                  "first_step_loss": first_loss, "loss_rel_diff_vs_pytorch": relative,
                                  "first_step_grad_norm": grad_norm, "grad_norm_rel_diff_vs_pytorch": grad_relative,
                                  "first_call_s": compile_s, "compiled_memory": memory})
        flag = "OK" if relative < LOSS_RTOL and grad_relative < GRAD_NORM_RTOL else "MISMATCH"
        print(f"[{name}] sftjax {label}: first-step loss {first_loss:.6f} (rel diff {relative:.1e}), grad norm "
              f"{grad_norm:.6f} (rel diff {grad_relative:.1e}) {flag}"
              + (f"  compiled temp {memory['temp_bytes'] / 2**20:.0f} MiB" if memory else ""), flush=True)

    step_times = interleaved_medians(steps, max(warmup - 1, 0), repeats)
    forward_times = interleaved_medians(forwards, 1, repeats) if profile else {}
    torch_median = statistics.median(step_times["pytorch"])
    record["pytorch"] = {"first_step_loss": torch_first_loss, "first_step_grad_norm": torch_grad_norm,
                         "median_s": torch_median,
                         "times_s": step_times["pytorch"], "tokens_per_s": tokens_per_step / torch_median,
                         "threads": torch.get_num_threads(),
                         "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if profile:
        record["pytorch"]["forward_median_s"] = statistics.median(forward_times["pytorch"])
    print(f"[{name}] pytorch: median {torch_median * 1e3:.0f} ms  {tokens_per_step / torch_median:.0f} tok/s",
          flush=True)
    for result in record["results"]:
        label = f"{result['attention']}/{result['cross_entropy']}"
        median = statistics.median(step_times[label])
        result.update(median_s=median, times_s=step_times[label], tokens_per_s=tokens_per_step / median,
                      speedup_vs_pytorch=torch_median / median)
        if profile:
            result["forward_median_s"] = statistics.median(forward_times[label])
        print(f"[{name}] sftjax {label}: median {median * 1e3:.0f} ms  {tokens_per_step / median:.0f} tok/s  "
              f"x{torch_median / median:.2f} vs pytorch", flush=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="7M model, 2 rows, 5 timed rounds (~1 min on 2 cores)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed rounds (one step of each configuration per round; medians)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration, the first one compiles")
    parser.add_argument("--profile", action="store_true", help="also time the forward pass alone")
    parser.add_argument("--output", type=pathlib.Path, default=None)
    args = parser.parse_args()
    models = args.models or (["llama_7m"] if args.quick else ["llama_7m", "llama_32m"])
    rows = args.rows or (2 if args.quick else 4)
    steps = args.steps or (5 if args.quick else 10)
    torch.set_num_threads(os.cpu_count() or 1)
    backend = jax.default_backend()

    started = time.perf_counter()
    load_before = os.getloadavg()
    records = [bench_model(name, rows, args.length, args.warmup, steps, args.profile) for name in models]
    report = {
        "device": backend, "jax_devices": [str(d) for d in jax.devices()],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "dtype": "float32", "quick": args.quick, "profile": args.profile,
        "optimizer": {"name": "adamw", "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "note": "medians of device-synchronized steps after warm-up; compare ratios within one run (shared CPU)",
        "models": records,
    }
    output = args.output or REPO / "benchmarks" / "results" / f"train_step_{backend}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output} ({report['wall_seconds']} s, load {load_before} -> {report['loadavg_after']})")
    mismatched = [r for m in records for r in m["results"]
                  if not (r["loss_rel_diff_vs_pytorch"] < LOSS_RTOL
                          and r["grad_norm_rel_diff_vs_pytorch"] < GRAD_NORM_RTOL)]
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
