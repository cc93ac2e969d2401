"""metrics.jsonl stays one run's history: a fresh run sets an old file aside, a resumed run sets aside the records
of steps it will repeat; nothing is deleted. The step counts real (non-padding) and trained tokens, the summary
reports slot, real and trained tokens per second; the W&B and MLflow loggers hold what metrics.jsonl holds."""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np
import pytest

from sftjax.train.metrics import MetricsLogger, set_aside_stale_records
from tests.conftest import require


def write_records(path, steps, *, torn_tail: bool = False):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps]
    text = "".join(lines) + ('{"step": 9, "lo' if torn_tail else "")
    path.write_text(text)
    return lines


def test_fresh_run_moves_the_old_file_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = write_records(path, [1, 2, 3])
    assert set_aside_stale_records(path, 0) == tmp_path / "metrics.previous-1.jsonl"
    assert not path.exists() and (tmp_path / "metrics.previous-1.jsonl").read_text() == "".join(first)
    second = write_records(path, [1, 2])
    logger = MetricsLogger(tmp_path, total_steps=4, tensorboard=False, progress=False)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert (tmp_path / "metrics.previous-2.jsonl").read_text() == "".join(second)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


def test_resume_keeps_steps_up_to_the_checkpoint_and_sets_the_rest_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = write_records(path, [1, 2, 3, 4, 5], torn_tail=True)
    assert set_aside_stale_records(path, 3) == tmp_path / "metrics.superseded.jsonl"
    assert path.read_text() == "".join(lines[:3])
    aside = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert aside[:2] == [line.strip() for line in lines[3:]] and aside[2] == '{"step": 9, "lo'
    assert set_aside_stale_records(path, 3) is None  # nothing stale left: the file is untouched
    assert path.read_text() == "".join(lines[:3])


def test_no_file_or_empty_file_is_left_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert set_aside_stale_records(path, 0) is None
    path.write_text("")
    assert set_aside_stale_records(path, 0) is None and path.exists()


def _without_tensorboardx(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboardX" else real(name, *args))


def test_tensorboard_defaults_off_with_a_note_when_tensorboardx_is_missing(tmp_path, monkeypatch, caplog):
    import pytest

    from sftjax.config import TrainSection
    from sftjax.errors import ConfigError

    assert TrainSection().tensorboard is None  # the default: on when tensorboardX is installed
    _without_tensorboardx(monkeypatch)
    with caplog.at_level("WARNING", logger="sftjax.train.metrics"):
        logger = MetricsLogger(tmp_path, total_steps=2, progress=False)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert logger.writer is None and not (tmp_path / "tensorboard").exists()
    notes = [r.getMessage() for r in caplog.records if "tensorboardX is not installed" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    with pytest.raises(ConfigError, match="train.tensorboard=true needs tensorboardX"):
        MetricsLogger(tmp_path / "explicit", total_steps=2, tensorboard=True, progress=False)


def test_tensorboard_default_writes_event_files_when_tensorboardx_is_installed(tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("tensorboardX is not installed")
    logger = MetricsLogger(tmp_path, total_steps=2, progress=False)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------ token counts: slots, real and trained tokens

TINY = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def tiny_config(assets_dir, out_dir, *extra):
    import sftjax

    return sftjax.load_config(TINY, overrides=[
        f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
        f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
        f"train.output_dir={out_dir}", "train.progress=false", "train.tensorboard=false", *extra])


class Recording:
    """Wraps a train dataset and keeps every batch the loop draws from it."""

    def __init__(self, data):
        self.data, self.batches = data, []

    def __iter__(self):
        for batch in self.data:
            self.batches.append({k: np.array(v) for k, v in batch.items()})
            yield batch


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_step_counts_real_tokens_and_trained_tokens_over_micro_batches(assets_dir, tmp_path):
    import jax

    import sftjax

    trainer = sftjax.Trainer(tiny_config(assets_dir, tmp_path))  # 16 rows x 64 in 2 micro-batches of 8
    rows, length = 16, 64
    rng = np.random.default_rng(0)
    batch = {k: np.zeros((rows, length), np.int32) for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                                             "positions")}
    real = trained = 0
    for row in range(rows):
        start = 0
        for segment in range(1, int(rng.integers(1, 4)) + 1):  # 1-3 examples, then padding
            n = int(rng.integers(3, 18))
            ids = rng.integers(1, 1000, n)
            sl = slice(start, start + n)
            batch["tokens"][row, sl] = ids
            batch["targets"][row, start:start + n - 1] = ids[1:]
            mask = (rng.random(n - 1) < 0.5).astype(np.int32)
            batch["loss_mask"][row, start:start + n - 1] = mask
            batch["segment_ids"][row, sl] = segment
            batch["positions"][row, sl] = np.arange(n)
            real, trained, start = real + n, trained + int(mask.sum()), start + n
    assert real < rows * length  # padding is there to be left out
    _, metrics = trainer.train_step(trainer.state, trainer.frozen, trainer.global_batch(batch), jax.random.key(0))
    assert float(metrics["real_tokens"]) == real
    assert float(metrics["trained_tokens"]) == trained


def test_summary_reports_slot_and_real_tokens_per_second(assets_dir, tmp_path):
    import sftjax

    trainer = sftjax.Trainer(tiny_config(assets_dir, tmp_path, "train.steps=3", "train.log_every=1"))
    trainer.train_data = recorded = Recording(trainer.train_data)
    result = trainer.fit()
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and len(recorded.batches) == 3
    for record, batch in zip(records, recorded.batches):
        elapsed = record["step_time_s"]  # one step per record
        slots = batch["tokens"].size
        real = np.count_nonzero(batch["segment_ids"])
        assert 0 < real < slots  # the tiny data leaves padding: the two rates differ
        assert record["tokens_per_s"] * elapsed == pytest.approx(slots, rel=1e-9)
        assert record["real_tokens_per_s"] * elapsed == pytest.approx(real, rel=1e-9)
        assert record["trained_tokens_per_s"] * elapsed == pytest.approx(batch["loss_mask"].sum(), rel=1e-9)
    assert result["train"]["real_tokens_per_s"] == records[-1]["real_tokens_per_s"]


# ---------------------------------------------------------------------------------- Weights & Biases, MLflow


def test_loggers_config_is_checked():
    import pytest

    from sftjax.config import TrainSection
    from sftjax.errors import ConfigError

    assert TrainSection().loggers == ()
    with pytest.raises(ConfigError, match="train.loggers lists tensorboard but train.tensorboard=false"):
        TrainSection(loggers=("tensorboard",), tensorboard=False).check()
    with pytest.raises(ConfigError, match="names a logger twice"):
        TrainSection(loggers=("wandb", "wandb")).check()


def test_a_missing_logger_package_is_one_line_before_the_model_loads(assets_dir, tmp_path, monkeypatch):
    import importlib.util

    import sftjax
    from sftjax.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("wandb", "mlflow") else real(name, *args))
    for name in ("wandb", "mlflow"):
        cfg = tiny_config(assets_dir, tmp_path, f"train.loggers=[jsonl, {name}]")
        with pytest.raises(ConfigError) as err:
            sftjax.Trainer(cfg)
        assert str(err.value) == (f"train.loggers lists {name} but the {name} package is not installed "
                                  f"(pip install {name}, or remove {name} from train.loggers)")


def expected_by_step(records) -> dict[int, dict]:
    """metrics.jsonl records merged per step (train and eval records share the last step), minus step/time."""
    out: dict[int, dict] = {}
    for record in records:
        out.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k not in ("step", "time")})
    return out


def wandb_records(run_file) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``): LevelDB log blocks of 32 KiB after a
    7-byte ``:W&B`` header, each chunk a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_run_holds_what_metrics_jsonl_holds(assets_dir, tmp_path, monkeypatch):
    require("wandb")
    import sftjax

    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "home"))
    cfg = tiny_config(assets_dir, tmp_path / "run", "train.steps=4", "train.log_every=2", "train.eval_every=2",
                      "train.loggers=[jsonl, wandb]", "train.wandb_project=sftjax-test", "train.run_name=tiny")
    sftjax.Trainer(cfg).fit()
    expected = expected_by_step(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    [run_file] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert sorted(history) == sorted(expected) == [2, 4]
    for step, values in expected.items():
        assert history[step].keys() == values.keys() and "eval/loss" in expected[4]
        for key, value in values.items():
            assert history[step][key] == pytest.approx(value, rel=1e-12), (step, key)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "sftjax-test" and run.display_name == "tiny"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["steps"] == 4 and config["train"]["loggers"] == ["jsonl", "wandb"]


def test_mlflow_file_store_holds_what_metrics_jsonl_holds(assets_dir, tmp_path, monkeypatch):
    require("mlflow")
    import sftjax

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = tiny_config(assets_dir, tmp_path / "run", "train.steps=4", "train.log_every=2", "train.eval_every=2",
                      "train.loggers=[mlflow]", "train.mlflow_experiment=sftjax-test")
    sftjax.Trainer(cfg).fit()
    expected = expected_by_step(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="file:" + str(tmp_path / "run" / "mlruns"))
    experiment = client.get_experiment_by_name("sftjax-test")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"  # the name defaults to output_dir's
    assert run.data.params["train.steps"] == "4" and run.data.params["model.init.hidden_size"] == "64"
    keys = set().union(*(values.keys() for values in expected.values()))
    assert set(run.data.metrics) == keys and "eval/loss" in keys
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == {step: pytest.approx(values[key], rel=1e-12) for step, values in expected.items()
                           if key in values}, key
