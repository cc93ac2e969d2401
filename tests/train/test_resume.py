"""End-to-end checkpointing of ``sftjax train`` in subprocesses (the one exact-resume test path).

* SIGKILL after a checkpoint exists, then the same command again: it resumes by itself (``resume: auto``) and
  ends with bit-identical parameters/optimizer state and identical per-step losses compared with an
  uninterrupted run (LoRA with dropout, and full fine-tuning; the data iterator resumes mid-epoch). The reference
  is the uninterrupted run; every logged loss of the interrupted run, before and after the crash, must match it.
* SIGTERM writes a checkpoint and exits 0 saying where; rerunning continues from it and finishes.

The killed run hangs after step 5 (the test patches ``MetricsLogger.advance`` from outside the CLI), so the kill
lands at a known point once checkpoint 3 is on disk; the CLI code itself runs unchanged.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")

CLI = """
import sys, time
hang_after = int(sys.argv[1])
if hang_after > 0:
    from sftjax.train import metrics

    advance = metrics.MetricsLogger.advance
    seen = []

    def advance_then_hang(self, steps=1):
        advance(self, steps)
        seen.append(steps)
        if len(seen) == hang_after:
            print("hanging", flush=True)
            time.sleep(600)

    metrics.MetricsLogger.advance = advance_then_hang
from sftjax.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _overrides(assets_dir, out_dir, *extra) -> list[str]:
    return [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
            f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
            f"train.output_dir={out_dir}", "train.progress=false", "train.tensorboard=false", "train.save=none",
            "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.head_dim=8",
            "model.init.max_position_embeddings=64", "data.eval_fraction=0", "train.steps=8",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1", "train.eval_every=0",
            "train.seed=3", "optim.learning_rate=1e-2", "optim.warmup_steps=2", *extra]


def _command(overrides, hang_after: int = -1) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(CLI), str(hang_after), "train", TINY, *overrides]


def _env(cache: pathlib.Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(overrides, cache) -> subprocess.CompletedProcess:
    return subprocess.run(_command(overrides), env=_env(cache), capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def _losses(run_dir: pathlib.Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def _checkpoint_arrays(step_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of the params and opt_state items, read with orbax alone (not through sftjax)."""
    import jax
    import orbax.checkpoint as ocp

    out = {}
    with ocp.StandardCheckpointer() as reader:
        for item in ("params", "opt_state"):
            tree = reader.restore(step_dir / item)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                out[item + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def _wait_for(predicate, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_cli_sigkill_and_rerun_resumes_bit_identical(tmp_path, assets_dir, jax_cache, lora):
    extra = ["checkpoint.save_every_steps=3", f"lora.enabled={str(lora).lower()}", "lora.r=4", "lora.alpha=8",
             f"lora.dropout={0.1 if lora else 0.0}"]
    reference = _run(_overrides(assets_dir, tmp_path / "reference", *extra), jax_cache)
    assert reference.returncode == 0, reference.stderr[-3000:]

    crashed = tmp_path / "crashed"
    command = _command(_overrides(assets_dir, crashed, *extra), hang_after=5)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, env=_env(jax_cache), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert _wait_for(lambda: (crashed / "checkpoints" / "3").is_dir(), proc), \
                (tmp_path / "killed.log").read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            proc.kill()
    assert not (crashed / "checkpoints" / "8").exists()
    resumed = _run(_overrides(assets_dir, crashed, *extra), jax_cache)  # the very same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint" in resumed.stderr and "at step 3 of 8" in resumed.stderr, resumed.stderr[-3000:]

    expected = dict(_losses(tmp_path / "reference"))
    assert sorted(expected) == list(range(1, 9)) and len(set(expected.values())) > 1
    logged = _losses(crashed)  # the killed process's rows up to its checkpoint, then the resumed one's
    assert [step for step, _ in logged] == list(range(1, 9))
    superseded = crashed / "metrics.superseded.jsonl"  # what the killed process logged after step 3, set aside
    if superseded.exists():
        assert all(json.loads(line)["step"] > 3 for line in superseded.read_text().splitlines())
    for step, loss in logged:
        assert loss == expected[step], (step, loss, expected[step])

    final_ref = _checkpoint_arrays(tmp_path / "reference" / "checkpoints" / "8")
    final_resumed = _checkpoint_arrays(crashed / "checkpoints" / "8")
    assert sorted(final_ref) == sorted(final_resumed) and any("lora" in k for k in final_ref) == lora
    for name in final_ref:
        np.testing.assert_array_equal(final_resumed[name], final_ref[name], err_msg=name)


@pytest.mark.slow
def test_cli_sigterm_writes_checkpoint_exits_zero_and_rerun_continues(tmp_path, assets_dir, jax_cache):
    run_dir = tmp_path / "stopped"
    overrides = _overrides(assets_dir, run_dir, "train.steps=100000", "lora.enabled=true", "lora.r=4")
    with open(tmp_path / "stopped.out", "w") as stdout, open(tmp_path / "stopped.log", "w") as log:
        proc = subprocess.Popen(_command(overrides), env=_env(jax_cache), cwd=REPO, stdout=stdout, stderr=log)
        try:
            metrics = run_dir / "metrics.jsonl"
            assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc), \
                (tmp_path / "stopped.log").read_text()[-3000:]
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, (tmp_path / "stopped.log").read_text()[-3000:]
            assert time.monotonic() - sent < 60
        finally:
            proc.kill()
    out = (tmp_path / "stopped.out").read_text()
    assert "SIGTERM received" in (tmp_path / "stopped.log").read_text()
    summary = json.loads(out[out.index("{"):])
    step = summary["stopped_at"]
    checkpoint = run_dir / "checkpoints" / str(step)
    assert f"checkpoint written to {checkpoint}" in out and summary["checkpoint"] == str(checkpoint)
    assert checkpoint.is_dir() and not (run_dir / "final").exists()
    assert max(s for s, _ in _losses(run_dir)) == step  # the partial logging window was written

    # rerun to two steps past the stop: it continues from the SIGTERM checkpoint and finishes
    finish = _run(_overrides(assets_dir, run_dir, f"train.steps={step + 2}", "lora.enabled=true", "lora.r=4"),
                  jax_cache)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert f"at step {step} of {step + 2}" in finish.stderr
    assert [s for s, _ in _losses(run_dir)][-2:] == [step + 1, step + 2]
    assert (run_dir / "checkpoints" / str(step + 2)).is_dir()
