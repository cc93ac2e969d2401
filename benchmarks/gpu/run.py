"""The GPU benchmark driver: every stage in its own process, each capped, results appended as they arrive.

    python3 -m benchmarks.gpu.run OUT_DIR [--dry-run] [--stages env,correctness,kernels] [--budget-s 290]

Standard library only (it must start on a machine where anything else might be missing). See
``benchmarks/gpu/__init__.py`` for the design and the files written; ``scripts/bench_gpu.sh`` is the entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
# stage -> [(module under benchmarks.gpu, framework, cap in seconds on the GPU)]; caps from BENCHMARKS.md's
# estimates with margin; each also shrinks to what is left of --budget-s.
STAGES = {
    "env": [("env_jax", "jax", 40), ("env_torch", "torch", 30)],
    "correctness": [("correctness", "jax", 100)],
    "kernels": [("kernels", "jax", 120)],
    "train": [("train", "jax", 210)],
    "torch": [("torch_loop", "torch", 80)],
}
GROUPS = {"first": "env,correctness,kernels", "second": "train,torch"}
BLOCKED = "grain,gguf,tensorboardX"  # absent on the GPU machine: blocked in both modes
DRY_RUN_CAP_FACTOR = 4  # the dry run's caps: a loaded CPU is slower at tiny shapes than the GPU at real ones
MIN_START_S = 10  # a process is not started with less than this left of the budget
KILL_GRACE_S = 5


def stage_env(out_dir: pathlib.Path, framework: str, dry_run: bool, deadline: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", SFTJAX_BENCH_OUT=str(out_dir), SFTJAX_BENCH_DEADLINE=f"{deadline:.1f}",
               SFTJAX_BENCH_DRY="1" if dry_run else "0", SFTJAX_BENCH_BLOCK=BLOCKED, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if framework == "jax":
        # one JAX process holds the GPU at a time; leave room for cuDNN/cuBLAS workspaces outside XLA's pool
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")
    else:
        env["JAX_PLATFORMS"] = "cpu"  # torch stages import sftjax's FLOP formulas: jax must stay off the GPU
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.pop("XLA_FLAGS", None)  # one CPU device, not the test suite's fake eight
    return env


_RUNNING: list[subprocess.Popen] = []  # the stage process of the moment, for the signal handler


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _stop(signum, frame):
    """The driver itself is being stopped (an outer timeout): take the running stage's process group with it."""
    for process in _RUNNING:
        _signal_group(process, signal.SIGKILL)
    sys.exit(128 + signum)


def run_process(command: list[str], env: dict, cap_s: float, log) -> dict:
    """Run ``command`` in a session of its own, its output teed to ``log`` and stdout; past ``cap_s`` its whole
    process group is stopped (SIGTERM, then SIGKILL after a grace period)."""
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, start_new_session=True)
    _RUNNING[:] = [process]

    def tee():
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    status = "ok"
    try:
        process.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
        status = "timeout"
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process, signal.SIGKILL)  # whatever of the group is left (children of the stage too)
        process.wait()
    reader.join(timeout=5)
    _RUNNING.clear()
    if status == "ok" and process.returncode != 0:
        status = "failed"  # the stage ran to its end; some measurement failed its check or raised
    return {"status": status, "returncode": process.returncode, "cap_s": round(cap_s, 1),
            "wall_s": round(time.time() - started, 1)}


def run_stage(module: str, framework: str, cap_s: float, out_dir: pathlib.Path, dry_run: bool, python: str,
              log) -> dict:
    """``benchmarks.gpu.<module>`` under ``cap_s``; its own deadline a grace period earlier, so it skips what
    would not fit instead of being killed."""
    deadline = time.time() + cap_s - KILL_GRACE_S
    env = stage_env(out_dir, framework, dry_run, deadline)
    return {"process": module, "framework": framework,
            **run_process([python, "-m", f"benchmarks.gpu.{module}"], env, cap_s, log)}


def append(path: pathlib.Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def summary(out_dir: pathlib.Path) -> list[str]:
    """A short table of what came back (the device tool returns the end of the output)."""
    lines = []
    for name in ("stages", "env", "correctness", "kernels", "train", "torch"):
        path = out_dir / f"{name}.jsonl"
        if not path.exists():
            continue
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        counts = {}
        for record in records:
            counts[record.get("status")] = counts.get(record.get("status"), 0) + 1
        lines.append(f"{name}.jsonl: {len(records)} records {counts}")
        for r in records:
            lines.extend(_summary_line(name, r))
    return lines


def _fmt(value, spec=".3g"):
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _summary_line(name: str, r: dict) -> list[str]:
    status = r.get("status")
    if name == "stages":
        return [f"  {r['process']:12s} {status:8s} rc={r.get('returncode')} {r.get('wall_s')} s of {r.get('cap_s')}"]
    if r.get("kind") == "ceiling" and status == "ok":
        value = r.get("tflops", r.get("tb_per_s"))
        unit = "TFLOP/s" if "tflops" in r else "TB/s"
        return [f"  ceiling {r.get('framework')} {r.get('op')}: {_fmt(value)} {unit}"]
    if status not in ("ok", None) and r.get("kind") != "host":
        detail = r.get("error") or r.get("reason") or ""
        return [f"  {status.upper()}: {r.get('kind')} {r.get('implementation', r.get('case', ''))} "
                f"{r.get('dtype', '')} {r.get('layout', '')} {detail[:160]}"]
    if name == "correctness" and status == "ok":
        errors = [r.get("rel_err_out", r.get("rel_err_loss")),
                  *(r.get("rel_err_dq_dk_dv") or r.get("rel_err_d_hidden_d_weight") or [])]
        return [f"  {r['kind']:13s} {r['implementation']:11s} {r['dtype']:8s} max rel err "
                f"{_fmt(max(e for e in errors if isinstance(e, (int, float))))} (bound {r['tolerance']})"]
    if name == "kernels" and status == "ok" and "forward_ms" in r:
        shape = r["shape"]
        label = f"D={shape['head_dim']} {r.get('layout')}" if r["kind"] == "attention" else f"V={shape['vocab']}"
        return [f"  {r['kind']:13s} {r['implementation']:11s} {label:14s} fwd {_fmt(r['forward_ms'])} ms, "
                f"fwd+bwd {_fmt(r['forward_backward_ms'])} ms"]
    if name in ("train", "torch") and r.get("kind") == "train_step" and status == "ok":
        label = f"{r.get('attention', 'pytorch')}/{r.get('cross_entropy', '')}"
        return [f"  {r['case']:16s} {label:22s} {_fmt(r['step_s'])} s/step, {_fmt(r['tokens_per_s'], '.0f')} tok/s,"
                f" MFU {_fmt(r.get('mfu_datasheet'))} (datasheet) {_fmt(r.get('mfu_measured_ceiling'))} (measured)"]
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: every stage and every file")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, in order (default: all). The two GPU calls: {GROUPS['first']} "
                             f"and {GROUPS['second']}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of this call; each stage's cap shrinks to what is left "
                             "(default: the sum of the stages' caps)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the stage processes")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    factor = DRY_RUN_CAP_FACTOR if args.dry_run else 1
    processes = [(module, framework, cap * factor) for name in names for module, framework, cap in STAGES[name]]
    budget = args.budget_s if args.budget_s is not None else sum(cap for _, _, cap in processes)
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    end = time.time() + budget
    signal.signal(signal.SIGTERM, _stop)
    results = []
    with open(out_dir / "log.txt", "a", encoding="utf-8") as log:
        print(f"bench_gpu: stages {','.join(names)}; dry run {args.dry_run}; budget {budget:.0f} s; out {out_dir}",
              flush=True)
        for module, framework, cap in processes:
            left = end - time.time()
            if left < MIN_START_S:
                result = {"process": module, "framework": framework, "status": "skipped", "returncode": None,
                          "cap_s": 0, "wall_s": 0, "reason": f"budget: {left:.0f} s left"}
            else:
                result = run_stage(module, framework, min(cap, left), out_dir, args.dry_run, args.python, log)
            result.update(dry_run=args.dry_run, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            append(out_dir / "stages.jsonl", result)
            results.append(result)
            print(f"bench_gpu: {module} {result['status']} ({result['wall_s']} s)", flush=True)
    print("\n".join(["", "bench_gpu summary", *summary(out_dir)]), flush=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
