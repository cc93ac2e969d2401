"""What every stage process shares: its output file, its deadline, per-measurement error capture, module blocking.

No jax or torch here: the PyTorch stages import this too. The driver (``run.py``) passes the run's settings
in the environment: ``SFTJAX_BENCH_OUT`` (the output folder), ``SFTJAX_BENCH_DEADLINE`` (Unix time by which the
stage must have finished), ``SFTJAX_BENCH_DRY`` ("1" for the CPU dry run) and ``SFTJAX_BENCH_BLOCK`` (modules
that must not be imported, comma-separated).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import sys
import time
import traceback

DRY_RUN = os.environ.get("SFTJAX_BENCH_DRY") == "1"
DEADLINE = float(os.environ.get("SFTJAX_BENCH_DEADLINE", "inf"))


def block_modules(names=None) -> None:
    """Make ``names`` (default: ``$SFTJAX_BENCH_BLOCK``) look uninstalled in this process: ``import`` raises
    ModuleNotFoundError and ``importlib.util.find_spec`` answers None, as on a machine without them."""
    if names is None:
        names = [n for n in os.environ.get("SFTJAX_BENCH_BLOCK", "").split(",") if n]
    for name in names:
        if sys.modules.get(name) is not None:
            raise RuntimeError(f"{name} was imported before it could be blocked")
        sys.modules[name] = None


def output_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SFTJAX_BENCH_OUT", "bench_gpu_out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def time_left() -> float:
    return DEADLINE - time.time()


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:600]


def _plain(value):
    """JSON-safe: non-finite floats become strings, numpy scalars and tuples plain values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Recorder:
    """Appends one JSON line per record to ``OUT/<filename>`` (flushed and synced at once) and prints it."""

    def __init__(self, filename: str, stage: str):
        self.path = output_dir() / filename
        self.stage = stage
        self.counts = {"ok": 0, "fail": 0, "error": 0, "skipped": 0}

    def write(self, record: dict) -> dict:
        record = _plain({"stage": self.stage, **record, "time_utc": now_utc()})
        status = record.get("status")
        if status in self.counts:
            self.counts[status] += 1
        line = json.dumps(record, sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        print(f"[{self.stage}] {line[:400]}", flush=True)
        return record

    def attempt(self, record: dict, measure, *, needs_s: float) -> dict:
        """Run ``measure() -> dict`` into ``record``: ``skipped`` when fewer than ``needs_s`` seconds are left
        before the deadline, ``error`` (with the message) when it raises, else its own status or ``ok``."""
        record = dict(record)
        if time_left() < needs_s:
            record.update(status="skipped", reason=f"deadline: {time_left():.0f} s left, about {needs_s:.0f} s needed")
            return self.write(record)
        start = time.perf_counter()
        try:
            record.update(measure())
            record.setdefault("status", "ok")
        except Exception as error:  # noqa: BLE001 - a failing measurement is a result, not the end of the stage
            record.update(status="error", error=short_error(error))
            traceback.print_exc(limit=4)
        record["wall_s"] = round(time.perf_counter() - start, 2)
        return self.write(record)

    def finish(self) -> int:
        """Exit status of the stage: 0 unless a measurement failed its check or raised."""
        print(f"[{self.stage}] done: {self.counts}", flush=True)
        return 1 if self.counts["fail"] or self.counts["error"] else 0
