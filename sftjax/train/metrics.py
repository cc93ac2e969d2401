"""Where training metrics go: a JSONL file, TensorBoard event files and a progress bar.

Only process 0 writes. Values arrive as host floats (the trainer fetches device metrics at log intervals
only, so logging never forces a per-step host sync).
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax


def device_memory_bytes() -> dict[str, float]:
    """Bytes in use / peak on device 0 where the backend reports them (empty dict on CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        stats = {}
    out = {}
    if "bytes_in_use" in stats:
        out["memory_gib"] = stats["bytes_in_use"] / 2**30
    if "peak_bytes_in_use" in stats:
        out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    return out


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricsLogger:
    """Append metric dicts to ``<dir>/metrics.jsonl`` and TensorBoard; show a tqdm bar with ETA."""

    def __init__(self, output_dir: str | pathlib.Path, *, total_steps: int, tensorboard: bool = True,
                 progress: bool = True, initial_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.output_dir = pathlib.Path(output_dir)
        self.jsonl = None
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict, *, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{f"{prefix}{k}": _clean(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    self.writer.add_scalar(f"{prefix}{key}", float(value), step)
            self.writer.flush()
        if self.bar is not None:
            shown = {k: f"{float(v):.4g}" for k, v in metrics.items()
                     if k in ("loss", "eval_loss", "tokens_per_s", "mfu", "learning_rate")}
            if prefix == "eval/":
                shown = {"eval_loss": f"{float(metrics.get('loss', float('nan'))):.4g}"}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
