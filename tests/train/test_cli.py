"""``sftjax train`` / ``sftjax eval`` from the command line: a full tiny run, and bad configs failing with one
line before anything compiles."""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.conftest import error_line

from sftjax.cli import main

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def overrides(assets_dir, out_dir, *extra):
    return [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
            f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
            f"train.output_dir={out_dir}", "train.progress=false", *extra]


def test_train_then_eval_cli(assets_dir, tmp_path, capsys):
    import sftjax

    out = tmp_path / "run"
    assert main(["train", TINY, *overrides(assets_dir, out, "train.steps=8", "train.log_every=4",
                                           "train.eval_every=0")]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert any("eval/loss" in r for r in records)  # eval at the end even with eval_every=0
    assert summary["eval"]["loss"] > 0
    assert list((out / "tensorboard").iterdir())
    model, _ = sftjax.load_model(out / "final")

    # eval evaluates what was trained: by default the config's output_dir (its newest checkpoint), or an
    # explicit run / checkpoint / exported model, each reproducing the final eval loss of the run
    for source in ([], ["--from", str(out)], ["--from", str(out / "checkpoints" / "8")], ["--from", str(out / "final")]):
        assert main(["eval", TINY, *overrides(assets_dir, out), *source]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        assert evaluated["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5), source
    assert "checkpoint" in evaluated["evaluated"] or "final" in evaluated["evaluated"]
    # a random init only when asked: its loss is far above the trained one
    assert main(["eval", TINY, *overrides(assets_dir, out), "--random-init"]) == 0
    baseline = json.loads(capsys.readouterr().out)
    assert baseline["evaluated"].startswith("untrained") and baseline["loss"] > summary["eval"]["loss"] + 0.5


def test_eval_without_a_trained_run_is_one_line(assets_dir, tmp_path, capsys):
    assert main(["eval", TINY, *overrides(assets_dir, tmp_path / "never_trained")]) == 2
    err = error_line(capsys.readouterr().err)
    assert "nothing trained to evaluate" in err and "--random-init" in err, err


@pytest.mark.parametrize("extra, words", [
    (["optim.learning_rat=1e-3"], ["unknown key optim.learning_rat", "did you mean optim.learning_rate"]),
    (["train.steps=many"], ["train.steps='many'", "integer"]),
    (["optim.learning_rate=-1e-3"], ["optim.learning_rate=-0.001", "must be > 0"]),
    (["train.global_batch_size=6", "train.micro_batch_size=3"], ["micro_batch_size=3", "not divisible"]),
    (["lora.enabled=true", "lora.target_modules=[qkv_proj]"], ["'qkv_proj' matches no module", "q_proj"]),
])
def test_bad_config_is_one_line_before_compiling(assets_dir, tmp_path, capsys, monkeypatch, extra, words):
    import jax

    if "not divisible" in words and jax.device_count() % 3 == 0:
        pytest.skip("3 rows split evenly over this device count")
    import sftjax.train.program as program_module  # import first: importing it while patched would keep the stub

    compiled = []
    monkeypatch.setattr(program_module, "make_train_step", lambda *a, **k: compiled.append(1))
    assert main(["train", TINY, *overrides(assets_dir, tmp_path), *extra]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("sftjax: error: "), err
    for word in words:
        assert word in err, err
    assert not compiled
