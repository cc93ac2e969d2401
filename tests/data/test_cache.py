"""Tokenization cache: hit on the second build, invalidation on every input, parallel == serial, bad rows."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sftjax.data.cache import tokenize_source
from sftjax.config import SourceConfig
from sftjax.errors import DataError
from tests.conftest import require

CALLS = {"count": 0}


def counting_encode(row, tokenizer, *, location=None, chat_template=None, **_):
    """Counts calls; tokens depend on the template so a stale cache would show."""
    CALLS["count"] += 1
    if "completion" not in row:
        raise DataError(f"{location}: row has no 'completion' column")
    ids = [len(chat_template or "")] + [ord(c) for c in row["prompt"] + row["completion"]]
    return {"input_ids": ids, "train_mask": [0] * (1 + len(row["prompt"])) + [1] * len(row["completion"])}


@pytest.fixture(scope="module")
def tokenizer(assets_dir):
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))


@pytest.fixture
def source_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"answer {i}"}) + "\n" for i in range(30)))
    return path


def run(path, tokenizer, cache_dir, **kwargs):
    kwargs.setdefault("encode_fn", counting_encode)
    kwargs.setdefault("num_workers", 1)
    return tokenize_source(SourceConfig(path=str(path)), tokenizer, cache_dir=cache_dir, **kwargs)


def test_second_build_hits_the_cache(source_file, tokenizer, tmp_path):
    CALLS["count"] = 0
    first = run(source_file, tokenizer, tmp_path / "cache")
    assert CALLS["count"] == 30 and not first.from_cache and len(first.examples) == 30
    second = run(source_file, tokenizer, tmp_path / "cache")
    assert CALLS["count"] == 30 and second.from_cache
    for key in ("input_ids", "train_mask", "offsets"):
        assert (getattr(first.examples, key) == getattr(second.examples, key)).all()
    expected = counting_encode({"prompt": "q7", "completion": "answer 7"}, None, chat_template=tokenizer.chat_template)
    assert second.examples.example(7)["input_ids"].tolist() == expected["input_ids"]


def test_cache_invalidates_on_template_file_and_settings(source_file, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    run(source_file, tokenizer, cache)
    CALLS["count"] = 0
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    other_template = run(source_file, tokenizer, cache, chat_template=template)
    assert not other_template.from_cache and CALLS["count"] == 30
    assert other_template.examples.input_ids[0] != run(source_file, tokenizer, cache).examples.input_ids[0]
    assert not run(source_file, tokenizer, cache, masking="all").from_cache
    with open(source_file, "a") as f:
        f.write(json.dumps({"prompt": "new", "completion": "row"}) + "\n")
    os.utime(source_file, ns=(1, 1))
    changed = run(source_file, tokenizer, cache)
    assert not changed.from_cache and len(changed.examples) == 31


def test_cache_invalidates_on_tokenizer(source_file, tokenizer, assets_dir, tmp_path):
    transformers = require("transformers")
    gpt2_file = assets_dir / "tokenizers" / "gpt2" / "tokenizer.json"
    gpt2 = transformers.PreTrainedTokenizerFast(tokenizer_file=str(gpt2_file))
    gpt2.chat_template = tokenizer.chat_template
    run(source_file, tokenizer, tmp_path / "cache")
    assert not run(source_file, gpt2, tmp_path / "cache").from_cache


def test_corrupt_cache_file_is_recomputed(source_file, tokenizer, tmp_path):
    first = run(source_file, tokenizer, tmp_path / "cache")
    with open(first.cache_file, "wb") as f:
        f.write(b"not an npz")
    again = run(source_file, tokenizer, tmp_path / "cache")
    assert not again.from_cache and (again.examples.input_ids == first.examples.input_ids).all()


def test_bad_rows_error_or_skip(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        run(path, tokenizer, tmp_path / "cache")
    skipped = run(path, tokenizer, tmp_path / "cache", on_bad_row="skip")
    assert len(skipped.examples) == 1 and skipped.dropped == {"bad_row": 1}


def test_parallel_tokenization_matches_serial_with_real_encoder(tmp_path, tokenizer, assets_dir, monkeypatch):
    import sftjax.data.cache as cache_module

    monkeypatch.setattr(cache_module, "CHUNK_ROWS", 40)
    lines = open(assets_dir / "datasets" / "gsm8k" / "train.jsonl").readlines()[:100]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(lines))
    source = SourceConfig(path=str(path), columns={"prompt": "question", "completion": "answer"})
    serial = tokenize_source(source, tokenizer, num_workers=1, use_cache=False)
    parallel = tokenize_source(source, tokenizer, num_workers=2, use_cache=False)
    assert len(serial.examples) == 100
    for key in ("input_ids", "train_mask", "offsets"):
        assert np.array_equal(getattr(serial.examples, key), getattr(parallel.examples, key))
    from sftjax.data.chat import encode_example

    row = json.loads(lines[57])
    reference = encode_example({"prompt": row["question"], "completion": row["answer"]}, tokenizer, masking="auto")
    assert parallel.examples.example(57)["input_ids"].tolist() == list(reference["input_ids"])
    assert parallel.examples.example(57)["train_mask"].tolist() == list(reference["train_mask"])


def test_conversation_without_assistant_turn_errors_unless_skipped(tmp_path, tokenizer):
    """The real encoder's drop reasons follow on_bad_row: an error by default, counted when skipped."""
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    no_reply = {"messages": [{"role": "user", "content": "anyone there?"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(no_reply) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2"):
        run(path, tokenizer, tmp_path / "cache", encode_fn=None)
    skipped = run(path, tokenizer, tmp_path / "cache", encode_fn=None, on_bad_row="skip")
    assert len(skipped.examples) == 1 and sum(skipped.dropped.values()) == 1
