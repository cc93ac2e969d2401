"""metrics.jsonl stays one run's history: a fresh run sets an old file aside, a resumed run sets aside the records
of steps it will repeat; nothing is deleted."""

from __future__ import annotations

import json

from sftjax.train.metrics import MetricsLogger, set_aside_stale_records


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
