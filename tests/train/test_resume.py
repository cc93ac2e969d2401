"""End-to-end checkpointing of ``sftjax train`` in subprocesses (the one exact-resume test path).

* SIGKILL after a checkpoint exists, then the same command again: it resumes by itself (``resume: auto``) and
  ends with bit-identical parameters/optimizer state and identical per-step losses compared with an
  uninterrupted run (LoRA with dropout, and full fine-tuning; the data iterator resumes mid-epoch). The reference
  is the uninterrupted run; every logged loss of the interrupted run, before and after the crash, must match it.
* SIGTERM writes a checkpoint and exits 0 saying where; the same command again continues from it, and the whole
  trajectory (every logged loss, the final parameters and optimizer state) is bit-identical to the uninterrupted
  run's.
* A checkpoint written on 8 devices (data x fsdp mesh) resumes on 4 and on 1 device: the continued run's losses
  and final state equal the uninterrupted 8-device run's to float32 summation order.

The interrupted runs hang after step 5 (the test patches ``MetricsLogger.advance`` from outside the CLI), so the
signal lands at a known point once checkpoint 3 is on disk; the CLI code itself runs unchanged.
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

from tests.oracle import assert_close

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")

CLI = """
import os, sys, time
hang_after = int(sys.argv[1])
if hang_after > 0:
    from sftjax.train import metrics

    advance = metrics.MetricsLogger.advance
    seen = []
    release = os.environ.get("SFTJAX_TEST_RELEASE")

    def advance_then_hang(self, steps=1):
        advance(self, steps)
        seen.append(steps)
        if len(seen) == hang_after:
            print("hanging", flush=True)
            deadline = time.monotonic() + 600  # until killed, or until the test creates the release file
            while time.monotonic() < deadline and not (release and os.path.exists(release)):
                time.sleep(0.05)

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


def _env(cache: pathlib.Path, devices: int = 1) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(overrides, cache, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(_command(overrides), env=_env(cache, devices), capture_output=True, text=True,
                          timeout=300, cwd=REPO)


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


def _extra(lora: bool) -> list[str]:
    return ["checkpoint.save_every_steps=3", f"lora.enabled={str(lora).lower()}", "lora.r=4", "lora.alpha=8",
            f"lora.dropout={0.1 if lora else 0.0}"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, assets_dir, jax_cache):
    """The uninterrupted 8-step run of ``_extra(lora)``, run once per module and variant."""
    runs = {}

    def get(lora: bool) -> pathlib.Path:
        if lora not in runs:
            out = tmp_path_factory.mktemp("reference") / ("lora" if lora else "full")
            done = _run(_overrides(assets_dir, out, *_extra(lora)), jax_cache)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[lora] = out
        return runs[lora]

    return get


def _assert_same_trajectory(run_dir: pathlib.Path, reference: pathlib.Path, lora: bool) -> None:
    """Every logged loss and every array of the final checkpoint bit-identical to the reference run's."""
    expected = dict(_losses(reference))
    assert sorted(expected) == list(range(1, 9)) and len(set(expected.values())) > 1
    logged = _losses(run_dir)
    assert [step for step, _ in logged] == list(range(1, 9))
    for step, loss in logged:
        assert loss == expected[step], (step, loss, expected[step])
    final_ref = _checkpoint_arrays(reference / "checkpoints" / "8")
    final = _checkpoint_arrays(run_dir / "checkpoints" / "8")
    assert sorted(final_ref) == sorted(final) and any("lora" in k for k in final_ref) == lora
    for name in final_ref:
        np.testing.assert_array_equal(final[name], final_ref[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_cli_sigkill_and_rerun_resumes_bit_identical(tmp_path, assets_dir, jax_cache, reference_run, lora):
    extra = _extra(lora)
    reference = reference_run(lora)

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

    superseded = crashed / "metrics.superseded.jsonl"  # what the killed process logged after step 3, set aside
    if superseded.exists():
        assert all(json.loads(line)["step"] > 3 for line in superseded.read_text().splitlines())
    # the killed process's rows up to its checkpoint, then the resumed one's
    _assert_same_trajectory(crashed, reference, lora)


@pytest.mark.slow
def test_cli_sigterm_checkpoints_exits_zero_and_rerun_matches_uninterrupted(tmp_path, assets_dir, jax_cache,
                                                                            reference_run):
    run_dir, release = tmp_path / "stopped", tmp_path / "release"
    overrides = _overrides(assets_dir, run_dir, *_extra(True))
    env = dict(_env(jax_cache), SFTJAX_TEST_RELEASE=str(release))
    stdout_path, log_path = tmp_path / "stopped.out", tmp_path / "stopped.log"
    with open(stdout_path, "w") as stdout, open(log_path, "w") as log:
        proc = subprocess.Popen(_command(overrides, hang_after=5), env=env, cwd=REPO, stdout=stdout, stderr=log)
        try:
            assert _wait_for(lambda: "hanging" in stdout_path.read_text(), proc), log_path.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            assert _wait_for(lambda: "SIGTERM received" in log_path.read_text(), proc), log_path.read_text()[-3000:]
            release.touch()  # step 5 ends; the loop sees the request, checkpoints and exits
            sent = time.monotonic()
            assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
            assert time.monotonic() - sent < 60
        finally:
            proc.kill()
    out = stdout_path.read_text()
    summary = json.loads(out[out.index("{"):])
    checkpoint = run_dir / "checkpoints" / "5"
    assert summary["stopped_at"] == 5 and summary["checkpoint"] == str(checkpoint)
    assert f"checkpoint written to {checkpoint}" in out
    assert checkpoint.is_dir() and not (run_dir / "checkpoints" / "8").exists() and not (run_dir / "final").exists()
    assert [s for s, _ in _losses(run_dir)] == [1, 2, 3, 4, 5]  # the partial logging window was written

    finish = _run(overrides, jax_cache)  # the very same command continues from the SIGTERM checkpoint
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "at step 5 of 8" in finish.stderr, finish.stderr[-3000:]
    _assert_same_trajectory(run_dir, reference_run(True), lora=True)


@pytest.mark.slow
def test_checkpoint_of_8_devices_continues_on_4_and_1_like_the_uninterrupted_run(tmp_path, assets_dir, jax_cache):
    """Full fine-tuning on a (data 4 x fsdp 2) mesh of 8 devices checkpoints at step 4; runs started from that
    checkpoint on 4 devices and on 1 device log steps 5..8 with the losses of the uninterrupted run and end with
    its parameters and optimizer state. Only the order of float32 sums differs (the row and weight shards are
    reduced over other device counts), and AdamW amplifies that in the updates of near-zero gradients."""
    extra = ["checkpoint.save_every_steps=4", "lora.enabled=false", "train.global_batch_size=16",
             "train.micro_batch_size=8"]
    reference = tmp_path / "reference"
    done = _run(_overrides(assets_dir, reference, *extra, "train.mesh.fsdp=2"), jax_cache, devices=8)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = dict(_losses(reference))
    assert sorted(expected) == list(range(1, 9)) and len(set(expected.values())) > 1
    final_ref = _checkpoint_arrays(reference / "checkpoints" / "8")
    for devices in (4, 1):
        run_dir = tmp_path / f"on{devices}"
        resumed = _run(_overrides(assets_dir, run_dir, *extra, f"checkpoint.resume={reference / 'checkpoints' / '4'}"),
                       jax_cache, devices=devices)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "at step 4 of 8" in resumed.stderr, resumed.stderr[-3000:]
        logged = _losses(run_dir)
        assert [step for step, _ in logged] == [5, 6, 7, 8]
        assert_close([loss for _, loss in logged], [expected[step] for step, _ in logged], 1e-5,
                     what=f"losses on {devices} devices")
        final = _checkpoint_arrays(run_dir / "checkpoints" / "8")
        assert sorted(final) == sorted(final_ref)
        for name, want in final_ref.items():
            if np.issubdtype(want.dtype, np.integer):
                np.testing.assert_array_equal(final[name], want, err_msg=name)
            else:
                assert_close(final[name], want, 5e-5, what=f"{name} on {devices} devices")
