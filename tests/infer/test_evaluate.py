"""Generation-based evaluation: answer matchers, prompts/targets from the eval split, and ``sftjax eval --generate``
whose printed accuracy is the share of correct rows in its predictions file (re-scored here independently)."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from tests.conftest import error_line

from sftjax.cli import main
from sftjax.errors import ConfigError
from sftjax.infer.evaluate import answer_matcher, prompts_and_targets

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


@pytest.mark.parametrize("spec, prediction, target, expected", [
    ("exact", " Paris \n", "Paris", True),
    ("exact", "Paris.", "Paris", False),
    ("number", "so the total is 1,000 apples", "He has 1000", True),
    ("number", "it is 12 or 13", "12", False),
    ("number", "3.50", "3.5", True),
    ("gsm8k", "2 + 2 = 4\n#### 4", "work...\n#### 4", True),
    ("gsm8k", "the answer is 18", "16 - 3 - 4 = 9 ... \n#### 18", True),  # no #### in the prediction: last number
    ("gsm8k", "#### 17", "#### 18", False),
    ("regex:answer is (\\w+)", "I think the answer is blue!", "the answer is blue", True),
    ("regex:[A-D]", "B", "C", False),
])
def test_matchers(spec, prediction, target, expected):
    matcher = answer_matcher(spec)
    assert matcher.correct(prediction, matcher.read(target)) is expected


def test_bad_answer_specs_are_one_line():
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        answer_matcher("regex:(unclosed")
    with pytest.raises(ConfigError, match="exact, number, gsm8k"):
        answer_matcher("fuzzy")


def test_prompt_is_the_template_render_before_the_last_reply(assets_dir):
    from sftjax.data.chat import encode_example
    from sftjax.data.packing import TokenizedExamples
    from sftjax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(assets_dir / "tokenizers" / "smollm2")
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 5."},
                {"role": "user", "content": "And 4+4?"}, {"role": "assistant", "content": "It is 8."}]
    examples = TokenizedExamples.from_examples([encode_example({"messages": messages}, tokenizer)])
    [(prompt, target)] = prompts_and_targets(examples, tokenizer)
    reference = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert prompt == tokenizer(reference, add_special_tokens=False)["input_ids"]
    assert target == "It is 8."


def _rows(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_eval_generate_accuracy_equals_its_predictions(assets_dir, tmp_path, capsys):
    """A tiny model trained a few steps, then eval --generate: the printed accuracy is the share of rows that an
    independent re-scoring (here: stripped equality, and a regex re-applied by the test) finds correct."""
    run = tmp_path / "run"
    base = [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
            f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
            f"train.output_dir={run}", "train.progress=false", "train.tensorboard=false"]
    assert main(["train", TINY, *base, "train.steps=2"]) == 0
    capsys.readouterr()
    for answer, rescore in [("exact", lambda p, t: p.strip() == t.strip()),
                            ("regex:(\\w+)", lambda p, t: (re.search(r"(\w+)", p) or [None, None])[1]
                             == re.search(r"(\w+)", t)[1])]:
        predictions = tmp_path / f"{answer[:5]}.jsonl"
        assert main(["eval", TINY, *base, "--generate", "--answer", answer, "--limit", "4", "--max-new-tokens", "8",
                     "--predictions", str(predictions)]) == 0
        out = capsys.readouterr().out
        accuracy = float(re.search(r"^accuracy: ([0-9.]+)$", out, re.M)[1])
        rows = _rows(predictions)
        assert len(rows) == 4 and all({"prompt", "prediction", "target", "correct"} <= set(r) for r in rows)
        assert all(r["correct"] == rescore(r["prediction"], r["target"]) for r in rows)
        assert accuracy == pytest.approx(sum(r["correct"] for r in rows) / len(rows), abs=1e-4)
    # eval splits whose targets the matcher cannot read, and prompts too long for the context, are one line
    for extra, words in [(["--answer", "gsm8k"], "none of the"),
                         (["--max-new-tokens", "100000"], "exceeds the model's context"),
                         (["--answer", "regex:("], "not a valid regular expression")]:
        assert main(["eval", TINY, *base, "--generate", "--limit", "2", *extra]) == 2
        err = error_line(capsys.readouterr().err)
        assert words in err, err
