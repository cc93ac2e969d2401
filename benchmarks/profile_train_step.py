"""Where one sftjax train step spends its time on the CPU: a jax.profiler trace, attributed to source code.

The step is the one ``bench_train_step.py`` times (same model, same packed batch, forward + backward + AdamW,
float32, every kernel implementation as configured). The script

1. compiles it, runs warm-up steps, then traces ``--steps`` steps with ``jax.profiler``;
2. reads the trace back (``jax.profiler.ProfileData``): XLA's CPU runtime records one event per executed HLO
   thunk (fusion, dot, copy, loop ...); nested events (a loop and its body) are reduced to *self* time;
3. attributes every HLO instruction to the innermost source frame in its metadata (the compiled module's
   stack-frame tables: file, function, line) and to a phase: ``bwd`` when its op name is under
   ``transpose(jvp(...))``, ``fwd`` under ``jvp(...)``, else ``update`` (gradient norm, optimizer, glue);
4. prints and records the totals per (source, phase), per kind of HLO op (dots, elementwise fusions, copies and
   transposes, loops), and the top instructions.

Times are *thread* time summed over XLA's worker threads (2 on the development machine), per step: with two
threads busy the sum exceeds the wall time, and on a loaded machine every number grows. Read the shares, not the
absolute values. ``--pieces`` also times the two kernels alone at the model's shapes (forward, and forward +
backward) next to their PyTorch counterparts, in interleaved rounds.

    python benchmarks/profile_train_step.py                      # llama_7m, xla_chunked kernels, 3 traced steps
    python benchmarks/profile_train_step.py --models llama_32m --pieces
Writes ``benchmarks/results/profile_train_step_<device>.json`` (and prints a text summary).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_train_step as bench  # noqa: E402
from sftjax.sharding import make_mesh  # noqa: E402
from sftjax.train.program import build_program  # noqa: E402

RUNTIME_EVENTS = ("ThunkExecutor", "SlinkyThreadPool")  # scheduling, not work


# ----------------------------------------------------------------------------------------- compiled HLO metadata
def hlo_source_map(hlo_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (innermost source 'file:function', op_name) from the module's stack-frame tables."""
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    current = None
    for line in hlo_text.splitlines()[:20000]:
        if line.strip() in tables:
            current = tables[line.strip()]
            continue
        if current is None:
            continue
        match = re.match(r"(\d+) (.*)$", line)
        if not match:
            if line.startswith(("HloModule", "%", "ENTRY")) or line.strip().startswith("%"):
                current = None
            continue
        current[int(match.group(1))] = match.group(2)
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}

    def location(frame_id):
        frame = tables["StackFrames"].get(frame_id, "")
        loc_id = re.search(r"file_location_id=(\d+)", frame)
        loc = tables["FileLocations"].get(int(loc_id.group(1)), "") if loc_id else ""
        file_id, function_id = (re.search(rf"{key}=(\d+)", loc) for key in ("file_name_id", "function_name_id"))
        if not file_id:
            return "?"
        path = files.get(int(file_id.group(1)), "?")
        short = path.split("site-packages/")[-1] if "site-packages" in path else os.path.relpath(path, REPO)
        function = functions.get(int(function_id.group(1)), "?") if function_id else "?"
        return f"{short}:{function}"

    result = {}
    instruction = r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"(?:[^\n]*?stack_frame_id=(\d+))?"
    for match in re.finditer(instruction, hlo_text, re.MULTILINE):
        name, op_name, frame = match.groups()
        result[name] = (location(int(frame)) if frame else "?", op_name)
    return result


def phase_of(op_name: str) -> str:
    if "transpose(jvp" in op_name:
        return "bwd"
    if "jvp(" in op_name:
        return "fwd"
    return "update"


def op_kind(name: str) -> str:
    base = re.sub(r"\.\d+$", "", name)
    if base.startswith(("ynn_fusion", "dot", "xnn_fusion")):
        return "matmul (dot / YNNPACK fusion)"
    if "copy" in base or "transpose" in base:
        return "copy / transpose (fused)"
    if base.startswith(("while", "cond", "call")):
        return "loop / control"
    if "gather" in base or "scatter" in base:
        return "gather / scatter"
    return "elementwise / reduce fusion"


# ------------------------------------------------------------------------------------------------- the trace
def self_times(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
    """Self time (ns) and count per event name over XLA's worker threads."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    profile = ProfileData.from_file(path)
    self_ns, counts = collections.defaultdict(float), collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            events = sorted((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events)
            stack: list[list] = []  # open events: [end, name, child_ns, duration]
            for start, end, name in [*events, (float("inf"), float("inf"), None)]:
                while stack and stack[-1][0] <= start:  # close every event that ended before this one starts
                    _, closed, child_ns, duration = stack.pop()
                    self_ns[closed] += duration - child_ns
                    if stack:
                        stack[-1][2] += duration
                if name is not None:
                    stack.append([end, name, 0.0, end - start])
                    counts[name] += 1
    return self_ns, counts


def profile_model(name: str, rows: int, length: int, implementation: str, steps: int) -> dict:
    spec = bench.MODELS[name]
    hf = bench.hf_llama(spec, length)
    batch = bench.packed_batch(rows, length, spec["vocab_size"])
    with tempfile.TemporaryDirectory(prefix=f"profile_{name}_") as model_dir:
        hf.save_pretrained(model_dir)
        # the same run as bench_train_step.py, built by the recipe `sftjax train` uses
        program = build_program(bench.run_config(model_dir, rows, implementation, implementation), mesh=make_mesh(),
                                total_steps=1000)
    state, frozen = program.state, program.frozen
    device_batch = {k: jax.device_put(v.reshape(1, rows, length), program.batch_sharding) for k, v in batch.items()}
    rng = jax.random.key(0)
    compiled = program.train_step.lower(state, frozen, device_batch, rng).compile()
    sources = hlo_source_map(compiled.as_text())

    def step(state):
        state, metrics = compiled(state, frozen, device_batch, rng)
        jax.block_until_ready(metrics["loss"])
        return state

    for _ in range(3):
        state = step(state)
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            start = time.perf_counter()
            state = step(state)
            walls.append(time.perf_counter() - start)
        jax.profiler.stop_trace()
        self_ns, counts = self_times(trace_dir)

    per_step_ms = {k: v / steps / 1e6 for k, v in self_ns.items() if not k.startswith(RUNTIME_EVENTS)}
    by_source, by_kind, by_phase = (collections.defaultdict(float) for _ in range(3))
    top = []
    for instruction, ms in per_step_ms.items():
        source, op_name = sources.get(instruction, ("(no metadata)", ""))
        phase = phase_of(op_name)
        by_source[f"{phase:6s} {source}"] += ms
        by_kind[f"{phase:6s} {op_kind(instruction)}"] += ms
        by_phase[phase] += ms
        top.append({"instruction": instruction, "ms": round(ms, 2), "calls": counts[instruction] // steps,
                    "phase": phase, "source": source, "kind": op_kind(instruction)})
    ordered = lambda d: {k: round(v, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {"model": name, "implementation": implementation, "rows": rows, "max_length": length,
            "traced_steps": steps, "wall_ms_per_step": [round(w * 1e3, 1) for w in walls],
            "thread_ms_per_step": round(sum(per_step_ms.values()), 1),
            "by_phase_ms": ordered(by_phase), "by_kind_ms": ordered(by_kind), "by_source_ms": ordered(by_source),
            "top_instructions": sorted(top, key=lambda r: -r["ms"])[:40]}


# ------------------------------------------------------------------------------------- kernels alone (--pieces)
def time_pieces(name: str, rows: int, length: int, rounds: int) -> dict:
    """Attention and fused CE alone at the model's shapes, sftjax implementations vs PyTorch, interleaved."""
    import torch

    from pallas_kernels.attention.api import attention
    from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy

    spec = bench.MODELS[name]
    heads, kv_heads, head_dim = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    hidden, vocab = spec["hidden_size"], spec["vocab_size"]
    batch = bench.packed_batch(rows, length, vocab)
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v, d_out = normal(rows, length, heads, head_dim), normal(rows, length, kv_heads, head_dim), \
        normal(rows, length, kv_heads, head_dim), normal(rows, length, heads, head_dim)
    h, w = normal(rows, length, hidden), normal(hidden, vocab) * 0.02
    seg, targets, mask = (jnp.asarray(batch[key]) for key in ("segment_ids", "targets", "loss_mask"))
    functions = {}
    for impl in ("reference", "xla_chunked"):
        attn = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, seg, implementation=impl))
        attn_grad = jax.jit(lambda q, k, v, do, impl=impl: jax.vjp(
            lambda q, k, v: attention(q, k, v, seg, implementation=impl), q, k, v)[1](do))
        def loss(h, w, impl=impl):
            return fused_linear_cross_entropy(h, w, targets, mask, implementation=impl).loss_sum

        ce, ce_grad = jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1)))
        functions[f"attention {impl} fwd"] = lambda f=attn: jax.block_until_ready(f(q, k, v))
        functions[f"attention {impl} fwd+bwd"] = lambda f=attn_grad: jax.block_until_ready(f(q, k, v, d_out))
        functions[f"cross_entropy {impl} fwd"] = lambda f=ce: jax.block_until_ready(f(h, w))
        functions[f"cross_entropy {impl} fwd+bwd"] = lambda f=ce_grad: jax.block_until_ready(f(h, w))
    torch_mask = bench.torch_block_causal_mask(batch["segment_ids"])
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).requires_grad_() for x in (q, k, v))
    tdo = torch.tensor(d_out).transpose(1, 2)
    th, tw = torch.tensor(h).requires_grad_(), torch.tensor(w.T.copy()).requires_grad_()
    ttargets = torch.as_tensor(batch["targets"], dtype=torch.long).flatten()
    tmask = torch.as_tensor(batch["loss_mask"], dtype=torch.float32).flatten()
    functional = torch.nn.functional

    def sdpa():
        return functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch_mask, enable_gqa=True)

    def torch_ce():
        logits = functional.linear(th, tw).flatten(0, 1)
        return (functional.cross_entropy(logits, ttargets, reduction="none") * tmask).sum()

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    functions["attention pytorch sdpa fwd"] = no_grad(sdpa)
    functions["attention pytorch sdpa fwd+bwd"] = lambda: sdpa().backward(tdo)
    functions["cross_entropy pytorch fwd"] = no_grad(torch_ce)
    functions["cross_entropy pytorch fwd+bwd"] = lambda: torch_ce().backward()
    times = bench.interleaved_medians(functions, 2, rounds)
    return {label: round(statistics.median(t) * 1e3, 2) for label, t in times.items()}


def print_summary(record: dict) -> None:
    walls = record["wall_ms_per_step"]
    print(f"\n[{record['model']}] {record['implementation']}: wall {statistics.median(walls):.0f} ms/step, "
          f"thread time {record['thread_ms_per_step']:.0f} ms/step (summed over XLA worker threads)")
    for title, key, limit in (("phase", "by_phase_ms", 5), ("kind of op", "by_kind_ms", 14),
                              ("source (innermost frame)", "by_source_ms", 25)):
        total = record["thread_ms_per_step"]
        print(f"  by {title}:")
        for label, ms in list(record[key].items())[:limit]:
            print(f"    {ms:8.1f} ms  {100 * ms / total:5.1f}%  {label}")
    print("  top instructions:")
    for row in record["top_instructions"][:15]:
        print(f"    {row['ms']:8.2f} ms  x{row['calls']:<3d} {row['phase']:6s} {row['instruction']:34s} "
              f"{row['source']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(bench.MODELS), default=["llama_7m"])
    parser.add_argument("--implementation", default="xla_chunked", help="attention and CE implementation")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--pieces", action="store_true", help="also time the kernels alone vs PyTorch")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds for --pieces")
    parser.add_argument("--output", type=pathlib.Path, default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    records = []
    for name in args.models:
        record = profile_model(name, args.rows, args.length, args.implementation, args.steps)
        print_summary(record)
        if args.pieces:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            record["pieces_median_ms"] = time_pieces(name, args.rows, args.length, args.rounds)
            for label, ms in record["pieces_median_ms"].items():
                print(f"    {ms:8.1f} ms  {label}")
        records.append(record)
    report = {"device": jax.default_backend(), "cpus": os.cpu_count(), "jax": jax.__version__,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "note": "thread time summed over XLA worker threads; shares matter, absolute values move with load",
              "models": records}
    output = args.output or REPO / "benchmarks" / "results" / f"profile_train_step_{jax.default_backend()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
