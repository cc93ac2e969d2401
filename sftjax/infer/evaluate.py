"""Generation-based evaluation: decode the eval split's prompts and score the answers.

Design in plain words
---------------------
The eval split is already tokenized with the training masks (``data.eval_sources`` or ``data.eval_fraction`` of
the training sources, exactly the rows ``sftjax eval`` scores by loss). Each example's **prompt** is its tokens up to
the start of its last trained run (the last assistant reply: everything the template writes before the reply,
generation header included), and its **target** is the text of that run without special tokens (the reply
without its end-of-turn marker). So no format or template is special-cased: whatever the model is trained to
produce after that prompt is what it is asked to produce. Prompts are decoded in batches (longest first, so
similar lengths share a batch), greedy unless a temperature is given, by the KV-cache generator.

Answers are compared by a matcher:

* ``exact``: the prediction equals the target after stripping whitespace;
* ``number``: the last number in each (commas removed) compared numerically (``1,000`` = ``1000.0``);
* ``gsm8k``: the number after ``####`` in each (GSM8K's answer format); a prediction without ``####`` falls back
  to its last number;
* ``regex:PATTERN``: the first match of PATTERN in each (its first group when it has one), compared as strings.

A target the matcher cannot read (no number, no ``####``, no match) makes the example unscorable; when no example
of the split is scorable the evaluation is refused with one line, since an accuracy over nothing means nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable

import numpy as np

from sftjax.config import ANSWERS, check_answer_spec
from sftjax.errors import ConfigError, DataError
from sftjax.infer.generate import generate_batch_ids, stop_token_ids

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def _gsm8k_number(text: str) -> float | None:
    found = _GSM8K.findall(text)
    return _to_number(found[-1]) if found else None


@dataclasses.dataclass(frozen=True)
class Matcher:
    """Reads an answer out of a text (``read``: None when there is none) and says whether two answers agree."""

    name: str
    read: Callable[[str], object]
    read_prediction: Callable[[str], object]

    def correct(self, prediction: str, target_answer) -> bool:
        got = self.read_prediction(prediction)
        if got is None or target_answer is None:
            return False
        if isinstance(target_answer, float):
            return math.isclose(got, target_answer, rel_tol=1e-9, abs_tol=1e-9)
        return got == target_answer


def answer_matcher(spec: str) -> Matcher:
    """The matcher of ``--answer`` (one of exact, number, gsm8k, regex:PATTERN)."""
    if spec == "exact":
        return Matcher("exact", lambda text: text.strip(), lambda text: text.strip())
    if spec == "number":
        return Matcher("number", _last_number, _last_number)
    if spec == "gsm8k":
        return Matcher("gsm8k", _gsm8k_number, lambda text: _gsm8k_number(text) if "####" in text
                       else _last_number(text))
    check_answer_spec(spec)
    if spec.startswith("regex:"):
        compiled = re.compile(spec[len("regex:"):])

        def read(text: str):
            match = compiled.search(text)
            if match is None:
                return None
            return match.group(1) if compiled.groups else match.group(0)

        return Matcher(spec, read, read)
    raise ConfigError(f"--answer {spec!r} is not one of {', '.join(ANSWERS)}")  # pragma: no cover (checked above)


def prompts_and_targets(examples, tokenizer) -> list[tuple[list[int], str]]:
    """(prompt ids, target text) per tokenized example: the prompt is everything before the last trained run."""
    out = []
    for index in range(len(examples)):
        example = examples.example(index)
        ids, mask = np.asarray(example["input_ids"]), np.asarray(example["train_mask"]).astype(bool)
        trained = np.flatnonzero(mask)
        if trained.size == 0:
            continue
        end = int(trained[-1]) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        if start == 0:  # a fully trained row (plain text): nothing to prompt with
            continue
        out.append((ids[:start].tolist(), tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True)))
    return out


def evaluate_generation(model, tokenizer, examples, *, answer: str = "exact", limit: int | None = None,
                        max_new_tokens: int = 256, batch_size: int = 8, temperature: float = 0.0,
                        seed: int = 0, chat_template=None, predictions: str | pathlib.Path | None = None) -> dict:
    """Decode and score the eval examples; returns {accuracy, correct, scored, examples, answer}.

    ``examples``: tokenized eval examples (``EvalData.examples``). ``predictions``: a JSONL file written with one
    object per example (``prompt``, ``prediction``, ``target``, ``correct``)."""
    matcher = answer_matcher(answer)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be >= 1")
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be >= 1")
    items = prompts_and_targets(examples, tokenizer)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise DataError("generation eval: the eval split has no example with a prompt and a trained answer")
    answers = [matcher.read(target) for _, target in items]
    if all(a is None for a in answers):
        raise DataError(f"generation eval: none of the {len(items)} eval targets has an answer that --answer "
                        f"{answer} can read (e.g. gsm8k needs '#### <number>', number needs a number)")
    context = getattr(model.config, "max_position_embeddings", None)
    for prompt, _ in items:
        if context and len(prompt) + max_new_tokens > context:
            raise DataError(f"generation eval: a prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} "
                            f"exceeds the model's context of {context} tokens; lower --max-new-tokens")
    stops = stop_token_ids(tokenizer, model.config, chat_template=chat_template)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    outputs: list[str | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        new_ids = generate_batch_ids(model, [items[i][0] for i in chunk], max_new_tokens=max_new_tokens,
                                     stop_ids=stops, temperature=temperature, seed=seed)
        for i, ids in zip(chunk, new_ids):
            outputs[i] = tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
    rows = []
    for (prompt, target), target_answer, prediction in zip(items, answers, outputs):
        rows.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=False), "prediction": prediction,
                     "target": target, "correct": matcher.correct(prediction, target_answer),
                     "scorable": target_answer is not None})
    scored = [r for r in rows if r["scorable"]]
    correct = sum(r["correct"] for r in scored)
    if predictions is not None:
        path = pathlib.Path(predictions)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"accuracy": correct / len(scored), "correct": correct, "scored": len(scored), "examples": len(rows),
            "answer": matcher.name}
