"""Packing: batch contract against a plain-Python oracle, every strategy and overflow mode, real GSM8K figures."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from sftjax.data.packing import (
    BATCH_KEYS,
    OVERFLOW_MODES,
    STRATEGIES,
    TokenizedExamples,
    pack,
    plan_repaired_bfd,
    plan_rows,
)
from sftjax.errors import DataError
from tests.conftest import require


def random_examples(rng, n, max_len, vocab=500):
    examples = []
    for _ in range(n):
        length = int(rng.integers(0, max_len + 1))
        ids = rng.integers(1, vocab, size=length).tolist()
        mask = (rng.random(length) < 0.6).astype(int).tolist()
        examples.append({"input_ids": ids, "train_mask": mask})
    return examples


def expected_segments(examples, max_length, overflow):
    """Plain-Python oracle: the (tokens, targets, loss_mask) of every segment that should be trained."""
    segments = []
    for ex in examples:
        ids, mask = list(ex["input_ids"]), list(ex["train_mask"])
        if len(ids) > max_length:
            if overflow == "drop":
                continue
            if overflow == "truncate":
                pieces = [(ids[:max_length], mask[:max_length])]
            else:
                pieces = [(ids[i : i + max_length], mask[i : i + max_length]) for i in range(0, len(ids), max_length)]
        else:
            pieces = [(ids, mask)]
        for piece_ids, piece_mask in pieces:
            if sum(piece_mask[1:]) == 0:
                continue
            segments.append((tuple(piece_ids), tuple(piece_ids[1:]) + (0,), tuple(piece_mask[1:]) + (0,)))
    return segments


def segments_of(batch):
    """Read the segments back out of a packed batch, checking the per-row layout on the way."""
    found = []
    for row in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][row]
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all(), "segments must be contiguous from the row start"
        for key in BATCH_KEYS:
            assert (batch[key][row, used:] == 0).all(), f"{key} must be 0 on padding"
        ids_in_row = seg[:used]
        if used:
            assert ids_in_row[0] == 1 and (np.diff(ids_in_row) >= 0).all() and (np.diff(ids_in_row) <= 1).all()
        for segment_id in np.unique(ids_in_row):
            where = np.flatnonzero(seg == segment_id)
            assert (np.diff(where) == 1).all()
            assert (batch["positions"][row, where] == np.arange(where.size)).all()
            tokens = tuple(batch["tokens"][row, where].tolist())
            targets = tuple(batch["targets"][row, where].tolist())
            loss_mask = tuple(batch["loss_mask"][row, where].tolist())
            found.append((tokens, targets, loss_mask))
    return found


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("overflow", OVERFLOW_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_strategy_reproduces_examples_exactly(strategy, overflow, seed):
    rng = np.random.default_rng(seed)
    max_length = int(rng.integers(8, 64))
    examples = random_examples(rng, 120, max_length * 2)
    batch, stats = pack(examples, max_length, strategy=strategy, overflow=overflow, seed=seed)
    for key in BATCH_KEYS:
        assert batch[key].dtype == np.int32 and batch[key].shape == (stats.rows, max_length)
    expected = expected_segments(examples, max_length, overflow)
    assert collections.Counter(segments_of(batch)) == collections.Counter(expected)
    assert stats.tokens == int((batch["segment_ids"] > 0).sum())
    assert stats.trained_tokens == int(batch["loss_mask"].sum())
    assert stats.efficiency == pytest.approx(stats.tokens / (stats.rows * max_length))
    too_long = sum(len(ex["input_ids"]) > max_length for ex in examples)
    if overflow == "truncate":
        assert stats.truncated == too_long
    elif overflow == "drop":
        assert stats.dropped_too_long == too_long
    else:
        assert stats.split == too_long
    if strategy == "none":
        assert (batch["segment_ids"].max(axis=1) == 1).all()


def test_targets_never_cross_segments_and_last_position_is_masked():
    examples = [{"input_ids": [5, 6, 7], "train_mask": [0, 1, 1]}, {"input_ids": [8, 9], "train_mask": [0, 1]}]
    batch, stats = pack(examples, 8, strategy="best")
    assert stats.rows == 1
    row = {k: v[0].tolist() for k, v in batch.items()}
    assert row["tokens"] == [5, 6, 7, 8, 9, 0, 0, 0]
    assert row["targets"] == [6, 7, 0, 9, 0, 0, 0, 0]
    assert row["loss_mask"] == [1, 1, 0, 1, 0, 0, 0, 0]
    assert row["segment_ids"] == [1, 1, 1, 2, 2, 0, 0, 0]
    assert row["positions"] == [0, 1, 2, 0, 1, 0, 0, 0]


def test_untrained_examples_are_dropped_and_counted():
    examples = [
        {"input_ids": [1, 2, 3], "train_mask": [1, 0, 0]},  # only the first token: nothing to predict
        {"input_ids": [4], "train_mask": [1]},
        {"input_ids": [], "train_mask": []},
        {"input_ids": [5, 6, 7, 8, 9, 10], "train_mask": [0, 0, 0, 0, 1, 1]},  # trained part cut by truncation
        {"input_ids": [5, 6], "train_mask": [0, 1]},
    ]
    batch, stats = pack(examples, 4, overflow="truncate")
    assert stats.dropped_no_trained_tokens == 4 and stats.dropped == 4 and stats.truncated == 1
    assert stats.rows == 1 and stats.trained_tokens == 1
    _, split_stats = pack(examples, 4, overflow="split")
    assert split_stats.split == 1 and split_stats.split_pieces == 2
    assert split_stats.split_pieces_dropped == 1 and split_stats.dropped_no_trained_tokens == 3


def test_bad_inputs_raise_data_errors():
    with pytest.raises(DataError, match="example 0"):
        pack([{"input_ids": [1, 2], "train_mask": [1]}], 8)
    with pytest.raises(DataError, match="packing="):
        pack([{"input_ids": [1, 2], "train_mask": [1, 1]}], 8, strategy="tightest")
    with pytest.raises(DataError, match="overflow="):
        pack([{"input_ids": [1, 2], "train_mask": [1, 1]}], 8, overflow="wrap")


def test_seeded_row_shuffle_is_deterministic():
    examples = random_examples(np.random.default_rng(3), 200, 30)
    a, _ = pack(examples, 32, seed=7)
    b, _ = pack(examples, 32, seed=7)
    c, _ = pack(examples, 32, seed=8)
    assert all((a[k] == b[k]).all() for k in BATCH_KEYS)
    assert not (a["tokens"] == c["tokens"]).all()
    assert collections.Counter(segments_of(a)) == collections.Counter(segments_of(c))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plans_respect_capacity_on_random_lengths(strategy):
    rng = np.random.default_rng(11)
    for max_length in (16, 100, 512):
        lengths = rng.integers(1, max_length + 1, size=400)
        rows = plan_rows(lengths, max_length, strategy)
        assert sorted(i for row in rows for i in row) == list(range(lengths.size))
        assert max(int(lengths[row].sum()) for row in rows) <= max_length
        if strategy == "best":
            assert len(rows) <= len(plan_rows(lengths, max_length, "bfd"))


def test_repaired_bfd_is_valid_and_never_worse_than_bfd():
    rng = np.random.default_rng(12)
    for max_length in (64, 512):
        lengths = np.concatenate([rng.integers(max_length // 5, max_length // 2, 300), rng.integers(1, max_length, 50)])
        rows = plan_repaired_bfd(lengths, max_length)
        assert sorted(i for row in rows for i in row) == list(range(lengths.size))
        assert max(int(lengths[row].sum()) for row in rows) <= max_length
        assert len(rows) <= len(plan_rows(lengths, max_length, "bfd"))


def test_tokenized_examples_round_trip_and_select():
    examples = random_examples(np.random.default_rng(5), 20, 10)
    flat = TokenizedExamples.from_examples(examples)
    assert len(flat) == 20
    picked = flat.select(np.array([3, 3, 0]))
    assert picked.example(1)["input_ids"].tolist() == examples[3]["input_ids"]
    assert picked.example(2)["train_mask"].tolist() == examples[0]["train_mask"]
    both = TokenizedExamples.concatenate([flat, picked])
    assert len(both) == 23 and both.example(22)["input_ids"].tolist() == examples[0]["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Real data: GSM8K train with the SmolLM2 tokenizer and chat template.


@pytest.fixture(scope="module")
def gsm8k_encoded(assets_dir):
    transformers = require("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))
    rows = [json.loads(line) for line in open(assets_dir / "datasets" / "gsm8k" / "train.jsonl")]
    from sftjax.data.chat import encode_example

    return [
        encode_example({"prompt": r["question"], "completion": r["answer"]}, tokenizer, masking="completion")
        for r in rows
    ]


def test_gsm8k_packing_efficiency(gsm8k_encoded):
    flat = TokenizedExamples.from_examples(gsm8k_encoded)
    assert len(flat) == 7473
    figures = {}
    for max_length in (2048, 512):
        for strategy in ("best", "bfd"):
            batch, stats = pack(flat, max_length, strategy=strategy)
            figures[(max_length, strategy)] = stats.efficiency
            assert stats.dropped == 0
            assert stats.trained_tokens == int(batch["loss_mask"].sum())
    assert figures[(2048, "best")] >= 0.995
    assert figures[(512, "best")] > figures[(512, "bfd")]


def test_gsm8k_rows_reproduce_examples(gsm8k_encoded):
    subset = gsm8k_encoded[:600]
    batch, _ = pack(subset, 2048, seed=0)
    assert collections.Counter(segments_of(batch)) == collections.Counter(expected_segments(subset, 2048, "truncate"))
