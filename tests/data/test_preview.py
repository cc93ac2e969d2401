"""`sftjax data preview`: highlighted examples, jsonl output and the summary, through the real CLI entry point."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from tests.conftest import error_line

from sftjax.cli import main

warnings.filterwarnings("ignore")


@pytest.fixture()
def run_config(tmp_path, assets_dir):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model:\n  path: {assets_dir / 'tokenizers' / 'smollm2'}\n"
        "data:\n  sources:\n"
        f"    - {assets_dir / 'datasets' / 'chat' / 'chat_tiny.json'}\n"
        f"    - path: {assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}\n"
        "  max_length: 128\n")
    return path


def test_text_preview_brackets_trained_tokens_and_summarizes(run_config, assets_dir, capsys):
    assert main(["data", "preview", str(run_config), "-n", "1", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    row = json.loads((assets_dir / "datasets" / "chat" / "chat_tiny.json").read_text())[0]
    replies = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
    assert re.findall(r"\[\[(.*?)\]\]", out, flags=re.S) == [f"{r}<|im_end|>" for r in replies]
    assert "rows read: 21" in out and "examples kept: 21" in out
    assert re.search(r"efficiency \d+\.\d\d%", out) and "length histogram" in out
    assert "truncated" in out


def test_jsonl_matches_transformers_reference(run_config, assets_dir, capsys):
    from transformers import AutoTokenizer

    assert main(["data", "preview", str(run_config), "-n", "3", "--format", "jsonl", "--limit", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    tok = AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))
    alpaca = json.loads((assets_dir / "datasets" / "instruction" / "alpaca_tiny.json").read_text())
    for line, row in zip(lines[1:], alpaca):
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        assert line["input_ids"] == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
        trained = [t for t, m in zip(line["input_ids"], line["train_mask"]) if m]
        assert tok.decode(trained) == row["output"] + "<|im_end|>"


def test_data_only_yaml_relative_paths_and_drops(tmp_path, assets_dir, capsys):
    (tmp_path / "d.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        '{"messages": [{"role": "user", "content": "only a question"}]}\n'
        '{"messages": [{"role": "robot", "content": "x"}]}\n')
    config = tmp_path / "data.yaml"
    config.write_text("sources: [d.jsonl]\non_bad_row: skip\nmax_length: 64\n")
    code = main(["data", "preview", str(config), "--tokenizer", str(assets_dir / "tokenizers" / "smollm2")])
    out = capsys.readouterr().out
    assert code == 0 and "rows read: 3" in out and "examples kept: 1" in out
    assert "dropped while encoding: 2 (bad_row: 1, no_assistant_turn: 1)" in out


def test_errors_are_one_line(tmp_path, assets_dir, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  sources: [missing.jsonl]\n  maskng: all\n")
    assert main(["data", "preview", str(config), "--tokenizer", str(assets_dir / "tokenizers" / "smollm2")]) == 2
    err = error_line(capsys.readouterr().err)
    assert "did you mean data.masking?" in err
    config.write_text("data:\n  sources: [missing.jsonl]\n")
    assert main(["data", "preview", str(config), "--tokenizer", str(assets_dir / "tokenizers" / "smollm2")]) == 2
    err = error_line(capsys.readouterr().err)
    assert "missing.jsonl: dataset file or directory does not exist" in err
    config.write_text("data:\n  sources: [x.jsonl]\n")
    assert main(["data", "preview", str(config)]) == 2
    assert "no tokenizer" in capsys.readouterr().err
