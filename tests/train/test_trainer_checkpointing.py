"""Checkpoint wiring of the Trainer and ``sftjax train`` in-process: the ``checkpoint:`` section is validated
before anything is built, a finished run is reported complete instead of retrained, an incompatible config and
``resume: never`` over existing checkpoints fail with one line (nothing is overwritten), raising ``train.steps``
continues from the final checkpoint, ``resume: <path>`` starts a new run from another run's checkpoint, and a
failing periodic save is logged while training goes on. (The exact-resume and signal tests run the CLI in
subprocesses: tests/train/test_resume.py.)"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from tests.conftest import error_line

from sftjax.cli import main
from sftjax.errors import CheckpointError, ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def overrides(assets_dir, out_dir, *extra):
    return [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
            f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
            f"train.output_dir={out_dir}", "train.progress=false", "train.tensorboard=false", "train.save=none",
            "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.head_dim=8",
            "data.eval_fraction=0", "train.global_batch_size=8", "train.log_every=1", "lora.enabled=true",
            "lora.r=4", *extra]


def logged_steps(run_dir: pathlib.Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, assets_dir):
    """A 4-step LoRA run with checkpoints at 2 and 4 (the final one)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", TINY, *overrides(assets_dir, run_dir, "train.steps=4",
                                           "checkpoint.save_every_steps=2", "checkpoint.keep=3")]) == 0
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    return run_dir


def copy_run(run_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.parametrize("setting, words", [
    ("checkpoint.save_every_step=3", ["unknown key checkpoint.save_every_step", "checkpoint.save_every_steps"]),
    ("checkpoint.keep=0", ["checkpoint.keep=0", "positive"]),
    ("checkpoint.resume=", ["checkpoint.resume=None", "expected a string"]),
    ("checkpoint=5", ["checkpoint=5 must be a mapping"]),
])
def test_bad_checkpoint_section_is_one_line_before_building(assets_dir, tmp_path, capsys, monkeypatch, setting,
                                                            words):
    built = []
    monkeypatch.setattr("sftjax.train.program.build_model", lambda *a, **k: built.append(1))
    assert main(["train", TINY, *overrides(assets_dir, tmp_path, "train.steps=2"), setting]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("sftjax: error: "), err
    for word in words:
        assert word in err, err
    assert not built


def test_config_checkpoint_property_uses_checkpoint_section_defaults():
    from sftjax.config import CheckpointSection, load_config

    # tiny_cpu.yaml sets save_every_steps, keep and resume; everything else takes the section's defaults.
    section = load_config(TINY, ["checkpoint.save_every_steps=100"]).checkpoint
    assert section == CheckpointSection(save_every_steps=100, keep=2, resume="auto")
    assert (section.save_every_minutes, section.keep_best, section.async_save) == (30.0, 0, True)
    with pytest.raises(ConfigError, match="checkpoint.save_every_minutes=-1"):
        load_config(TINY, ["checkpoint.save_every_minutes=-1"]).checkpoint


def test_finished_run_is_reported_complete_not_retrained(finished_run, tmp_path, assets_dir, capsys, monkeypatch):
    run_dir = copy_run(finished_run, tmp_path)
    monkeypatch.setattr("sftjax.train.trainer.Trainer.fit", lambda self: pytest.fail("retrained a finished run"))
    capsys.readouterr()
    assert main(["train", TINY, *overrides(assets_dir, run_dir, "train.steps=4")]) == 0
    out = capsys.readouterr().out
    assert "run already complete" in out and "step 4 of 4" in out
    assert logged_steps(run_dir) == [1, 2, 3, 4]


def test_incompatible_config_names_the_fields_in_one_line(finished_run, tmp_path, assets_dir, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    capsys.readouterr()
    assert main(["train", TINY, *overrides(assets_dir, run_dir, "train.steps=6", "lora.r=8")]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("sftjax: error: "), err
    assert "incompatible config" in err and "lora.r: 4 -> 8" in err, err
    assert logged_steps(run_dir) == [1, 2, 3, 4]


def test_resume_never_refuses_a_directory_with_checkpoints(finished_run, tmp_path, assets_dir, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["train", TINY, *overrides(assets_dir, run_dir, "train.steps=4", "checkpoint.resume=never")]) == 2
    err = error_line(capsys.readouterr().err)
    assert "checkpoint.resume=never" in err and "refusing to overwrite" in err, err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before

    # resume=never in a fresh directory trains from scratch
    fresh = tmp_path / "fresh"
    assert main(["train", TINY, *overrides(assets_dir, fresh, "train.steps=2", "checkpoint.resume=never")]) == 0
    assert logged_steps(fresh) == [1, 2]


def test_more_steps_continue_from_the_final_checkpoint_and_append_metrics(finished_run, tmp_path, assets_dir):
    from sftjax.config import load_config
    from sftjax.train.trainer import Trainer

    run_dir = copy_run(finished_run, tmp_path)
    trainer = Trainer(load_config(TINY, overrides(assets_dir, run_dir, "train.steps=6",
                                                  "checkpoint.save_every_steps=2", "checkpoint.keep=3")))
    restored = trainer.open_checkpoints()
    assert restored.step == 4 and trainer.start_step == 4
    assert trainer.train_data.get_state()["step"] == 4  # the data iterator continues, not restarts
    trainer.fit()
    trainer.close_checkpoints()
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # appended, not truncated
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]

    # resume: <path> starts another run directory from that run's step-4 checkpoint
    other = Trainer(load_config(TINY, overrides(assets_dir, tmp_path / "other", "train.steps=6",
                                                f"checkpoint.resume={run_dir / 'checkpoints' / '4'}")))
    assert other.open_checkpoints().step == 4 and other.start_step == 4
    other.close_checkpoints()


def test_failed_periodic_save_is_logged_and_training_goes_on(tmp_path, assets_dir, monkeypatch, caplog):
    from sftjax.train.checkpoint import CheckpointManager
    from sftjax.config import load_config
    from sftjax.train.trainer import Trainer

    real_save = CheckpointManager.maybe_save

    def failing_periodic_save(self, step, state, *, force=False, **kwargs):
        if step < 3:  # the periodic saves of steps 1 and 2 fail; the final one (step 3) does not
            raise CheckpointError(f"saving checkpoint step {step} failed: no space left on device (errno 28)")
        return real_save(self, step, state, force=force, **kwargs)

    monkeypatch.setattr(CheckpointManager, "maybe_save", failing_periodic_save)
    trainer = Trainer(load_config(TINY, overrides(assets_dir, tmp_path / "run", "train.steps=3",
                                                  "checkpoint.save_every_steps=1")))
    trainer.open_checkpoints()
    with caplog.at_level("ERROR", logger="sftjax.train"):
        trainer.fit()
    trainer.close_checkpoints()
    assert logged_steps(tmp_path / "run") == [1, 2, 3]
    assert "no space left on device" in caplog.text and "training continues" in caplog.text
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["3"]


def test_lora_resume_refuses_a_changed_base_model(tmp_path, assets_dir, capsys):
    """Adapters are trained against specific base weights: resuming them on other weights is refused."""
    from flax import nnx

    from sftjax.models.config import ModelConfig
    from sftjax.models.decoder import Decoder
    from sftjax.models.loading import save_model

    config = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)
    base = tmp_path / "base"
    save_model(Decoder(config, rngs=nnx.Rngs(0)), config, base)
    run_dir = tmp_path / "run"
    args = overrides(assets_dir, run_dir, "model.init=", f"model.path={base}", "checkpoint.save_every_steps=2")
    assert main(["train", TINY, *args, "train.steps=2"]) == 0
    save_model(Decoder(config, rngs=nnx.Rngs(1)), config, base)  # same files, other weights
    capsys.readouterr()
    assert main(["train", TINY, *args, "train.steps=4"]) != 0
    err = error_line(capsys.readouterr().err)
    assert "was trained on base model" in err and str(base) in err, err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
