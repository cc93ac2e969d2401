"""Where training metrics go: a JSONL file, TensorBoard event files, optional Weights & Biases and MLflow runs,
and a progress bar.

TensorBoard files need tensorboardX; ``tensorboard=None`` (the config's default) writes them when it is
installed and otherwise logs one line saying they are off, so a machine without it still trains.
``train.loggers`` adds ``wandb`` (offline by default: run files in ``<output_dir>/wandb``, ``wandb sync`` uploads
them) and ``mlflow`` (a file store in ``<output_dir>/mlruns``, opted into with ``MLFLOW_ALLOW_FILE_STORE=true`` as
MLflow 3 asks, unless ``train.mlflow_tracking_uri`` or ``$MLFLOW_TRACKING_URI`` names another store); each gets the same records as metrics.jsonl, keyed by step, and the run's
config. A logger whose package is missing is a one-line ConfigError before the model loads (:func:`check_loggers`).
Only process 0 writes. Values arrive as host floats (the trainer fetches device metrics at log intervals
only, so logging never forces a per-step host sync).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
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


LOGGER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # train.loggers entry -> the module it needs


def check_loggers(loggers) -> None:
    """A one-line ConfigError when a logger named in ``train.loggers`` lacks its package."""
    for name in loggers:
        module = LOGGER_PACKAGES.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.loggers lists {name} but the {module} package is not installed "
                              f"(pip install {module}, or remove {name} from train.loggers)")


def flat_config(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other values stay as they are."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class WandbSink:
    """One Weights & Biases run; ``mode="offline"`` writes it under ``<output_dir>/wandb`` only."""

    def __init__(self, output_dir: pathlib.Path, *, project: str, name: str, mode: str, config: dict | None):
        import wandb

        self.run = wandb.init(project=project, name=name, dir=str(output_dir), mode=mode, config=config or {},
                              settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))

    def log(self, step: int, record: dict[str, float]) -> None:
        self.run.log(record, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """One MLflow run in experiment ``experiment`` at ``tracking_uri`` (the config as params, metrics per step)."""

    def __init__(self, tracking_uri: str, *, experiment: str, name: str, config: dict | None):
        if tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store (in maintenance mode, still working) unless this opts in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(key, str(value)[:500]) for key, value in flat_config(config or {}).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, record: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, step) for key, value in record.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_sinks(train, output_dir: pathlib.Path, config: dict | None = None) -> list:
    """The W&B / MLflow sinks that ``train`` (a TrainSection) asks for, each opened as one new run."""
    check_loggers(train.loggers)
    name = train.run_name or output_dir.absolute().name
    sinks = []
    for logger_name in train.loggers:
        if logger_name == "wandb":
            sinks.append(WandbSink(output_dir, project=train.wandb_project, name=name, mode=train.wandb_mode,
                                   config=config))
        elif logger_name == "mlflow":
            uri = (train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                   or "file:" + str((output_dir / "mlruns").absolute()))
            sinks.append(MlflowSink(uri, experiment=train.mlflow_experiment, name=name, config=config))
    return sinks


class MetricsLogger:
    """Append metric dicts to ``<dir>/metrics.jsonl``, TensorBoard and the ``sinks`` (``open_sinks``, called here
    on process 0 from ``train`` when given); show a tqdm bar with ETA."""

    def __init__(self, output_dir: str | pathlib.Path, *, total_steps: int, tensorboard: bool | None = None,
                 progress: bool = True, initial_step: int = 0, train=None, run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.output_dir = pathlib.Path(output_dir)
        self.jsonl = None
        self.writer = None
        self.bar = None
        self.sinks: list = []
        if not self.enabled:
            return
        if train is not None and "tensorboard" in train.loggers:
            tensorboard = True
        write_events = tensorboard_enabled(tensorboard)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        set_aside_stale_records(path, initial_step)
        self.jsonl = open(path, "a", encoding="utf-8")
        if write_events:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        if train is not None:
            self.sinks = open_sinks(train, self.output_dir, run_config)
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
        if self.sinks:
            finite = {f"{prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
            for sink in self.sinks:
                sink.log(step, finite)
        if self.bar is not None:
            shown = {k: f"{float(v):.4g}" for k, v in metrics.items()
                     if k in ("loss", "eval_loss", "tokens_per_s", "real_tokens_per_s", "mfu", "learning_rate")}
            if prefix == "eval/":
                shown = {"eval_loss": f"{float(metrics.get('loss', float('nan'))):.4g}"}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
