"""Tests of sftjax.train.preemption: a first signal becomes a flag, the loop checkpoints and exits 0; a second exits now."""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sftjax.train.preemption import PreemptionGuard

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_first_signal_sets_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    out = io.StringIO()
    with PreemptionGuard(stream=out) as guard:
        assert not guard.requested and not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the Python-level handler runs at the next bytecode boundary
        assert guard.requested and guard.should_stop(1)
        assert guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    assert "SIGTERM received" in out.getvalue()
    assert "checkpoint written to /x/7" in guard.stop_message("/x/7")


def test_request_from_code_and_single_process_sync_point_fallback():
    guard = PreemptionGuard(use_sync_point=True)  # one process: JAX's sync point just says "no"
    assert not guard.should_stop(3)
    guard.request("time limit")
    assert guard.requested and guard.signal_name == "time limit"
    assert PreemptionGuard(use_sync_point=False).should_stop(0) is False


TOY_LOOP = """
import sys, time, pathlib
import jax, jax.numpy as jnp
from sftjax.train.checkpoint import CheckpointManager
from sftjax.train.preemption import PreemptionGuard
root = pathlib.Path(sys.argv[1])
w = jnp.zeros(1000)
manager = CheckpointManager(root, {"model": {"path": "toy"}}, save_every_steps=1000, keep=2)
with PreemptionGuard() as guard:
    for step in range(1, 100000):
        w = w + 1.0                       # the "train step"
        time.sleep(0.02)
        manager.maybe_save(step, {"params": {"w": w}}, data_state={"index": step})
        if step == 3:
            print("running", flush=True)
        if guard.should_stop(step):
            manager.save(step, {"params": {"w": w}}, data_state={"index": step})
            manager.close()
            print(guard.stop_message(root / str(step)), flush=True)
            print("STEP", step, flush=True)
            sys.exit(0)
        if IGNORE_FLAG_AFTER_FIRST and guard.requested:
            time.sleep(60)                # e.g. a long final save the user does not want to wait for
"""


def _start(script: str, *args) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"child never printed {text!r}: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_and_exits_zero(tmp_path, sig):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sftjax.train.checkpoint import CheckpointManager

    root = tmp_path / "ck"
    proc = _start(TOY_LOOP.replace("IGNORE_FLAG_AFTER_FIRST", "False"), root)
    _wait_for_line(proc, "running")
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    assert proc.returncode == 0, err[-2000:]
    assert elapsed < 30
    step = int(out.split("STEP")[1])
    assert f"checkpoint written to {root / str(step)}" in out
    assert f"{signal.Signals(sig).name} received" in err
    with CheckpointManager(root, {"model": {"path": "toy"}}) as m:
        assert m.latest_step == step
        restored = m.restore_latest({"params": {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}})
    np.testing.assert_array_equal(restored.state["params"]["w"], np.full(1000, step, np.float32))
    assert restored.data_state == {"index": step}


def test_second_ctrl_c_exits_at_once(tmp_path):
    proc = _start(TOY_LOOP.replace("IGNORE_FLAG_AFTER_FIRST", "True").replace(
        "if guard.should_stop(step):", "if False:"), tmp_path / "ck")
    _wait_for_line(proc, "running")
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    err_text = ""
    while "SIGINT received" not in err_text and time.monotonic() < deadline:
        err_text += proc.stderr.readline()
    assert "SIGINT received" in err_text
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    assert proc.returncode == 128 + signal.SIGINT
    assert time.monotonic() - sent < 10
    assert "exiting now" in proc.stderr.read()
