"""Where training metrics go: a JSONL file, TensorBoard event files and a progress bar.

TensorBoard files need tensorboardX; ``tensorboard=None`` (the config's default) writes them when it is
installed and otherwise logs one line saying they are off, so a machine without it still trains.
Only process 0 writes. Values arrive as host floats (the trainer fetches device metrics at log intervals
only, so logging never forces a per-step host sync).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import pathlib
import time

import jax

from sftjax.errors import ConfigError

logger = logging.getLogger(__name__)


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


def set_aside_stale_records(path: pathlib.Path, initial_step: int) -> pathlib.Path | None:
    """Keep ``path`` (metrics.jsonl) a record of one run's history, nothing deleted.

    A fresh run (``initial_step`` 0) in a directory that already has metrics moves the old file to
    ``metrics.previous-<n>.jsonl``. A run resumed at step S keeps the records up to S and moves later ones (steps
    the killed run logged after its last checkpoint, which the resumed run repeats) to
    ``metrics.superseded.jsonl``. Returns where records were moved, or None.
    """
    if not path.exists() or path.stat().st_size == 0:
        return None
    if initial_step == 0:
        index = 1
        while (target := path.with_name(f"metrics.previous-{index}.jsonl")).exists():
            index += 1
        path.rename(target)
        return target
    keep, stale = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            step = json.loads(line).get("step")
        except ValueError:  # a line cut short by the kill: not a record
            stale.append(line if line.endswith("\n") else line + "\n")
            continue
        (stale if isinstance(step, int) and step > initial_step else keep).append(line)
    if not stale:
        return None
    superseded = path.with_name("metrics.superseded.jsonl")
    with open(superseded, "a", encoding="utf-8") as handle:
        handle.writelines(stale)
    temporary = path.with_name("metrics.jsonl.tmp")
    temporary.write_text("".join(keep), encoding="utf-8")
    temporary.replace(path)  # atomic: a kill now leaves either the old or the new file
    return superseded


def tensorboard_enabled(requested: bool | None) -> bool:
    """Whether to write TensorBoard files: ``requested``, or (None) whether tensorboardX is installed."""
    installed = importlib.util.find_spec("tensorboardX") is not None
    if requested and not installed:
        raise ConfigError("train.tensorboard=true needs tensorboardX, which is not installed "
                          "(pip install tensorboardX, or set train.tensorboard=false)")
    if requested is None and not installed:
        logger.warning("tensorboardX is not installed: TensorBoard logging is off, metrics.jsonl is still written "
                       "(pip install tensorboardX for event files)")
    return installed if requested is None else requested


class MetricsLogger:
    """Append metric dicts to ``<dir>/metrics.jsonl`` and TensorBoard; show a tqdm bar with ETA."""

    def __init__(self, output_dir: str | pathlib.Path, *, total_steps: int, tensorboard: bool | None = None,
                 progress: bool = True, initial_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.output_dir = pathlib.Path(output_dir)
        self.jsonl = None
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        write_events = tensorboard_enabled(tensorboard)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        set_aside_stale_records(path, initial_step)
        self.jsonl = open(path, "a", encoding="utf-8")
        if write_events:
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
