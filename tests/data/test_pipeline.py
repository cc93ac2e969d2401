"""Pipeline: determinism, exact resume, per-process shares, eval split, mixing weights."""

from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest

from sftjax.config import DataConfig
from sftjax.data.pipeline import build_datasets, mix_indices
from sftjax.errors import ConfigError, DataError
from tests.conftest import require

MAX_LENGTH = 48


def char_encode(row, tokenizer, *, location=None, **_):
    """A transparent stand-in for encode_example: one token per character, the completion trained."""
    prompt, completion = row["prompt"], row["completion"]
    ids = [1] + [ord(c) % 400 + 2 for c in prompt] + [ord(c) % 400 + 2 for c in completion]
    mask = [0] * (1 + len(prompt)) + [1] * len(completion)
    return {"input_ids": ids, "train_mask": mask}


class NoTokenizer:
    """The cache hashes the tokenizer; these tests' encoder needs none."""

    chat_template = "{{ messages }}"

    def get_vocab(self):
        return {"a": 0}

    def __len__(self):
        return 1


def write_rows(path, count, seed, tag):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(count):
            prompt = f"{tag}{i}:" + "p" * int(rng.integers(1, 12))
            completion = "c" * int(rng.integers(1, 30))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


@pytest.fixture
def data_files(tmp_path):
    write_rows(tmp_path / "a.jsonl", 90, 0, "a")
    write_rows(tmp_path / "b.jsonl", 40, 1, "b")
    return tmp_path


def make_config(tmp_path, **overrides):
    settings = {"sources": [str(tmp_path / "a.jsonl")], "max_length": MAX_LENGTH, "seed": 3,
                "cache_dir": str(tmp_path / "cache"), "prefetch": 2}
    settings.update(overrides)
    return DataConfig.from_dict(settings)


def build(config, batch=4, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return build_datasets(config, NoTokenizer(), global_batch_size=batch, encode_fn=char_encode, **kwargs)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        set(a) == set(b) and all((a[k] == b[k]).all() for k in a) for a, b in zip(batches_a, batches_b)
    )


def segment_tokens(batches):
    """Every non-padding segment's tokens, as tuples."""
    found = []
    for batch in batches:
        for row in range(batch["tokens"].shape[0]):
            for segment_id in np.unique(batch["segment_ids"][row]):
                if segment_id:
                    found.append(tuple(batch["tokens"][row][batch["segment_ids"][row] == segment_id].tolist()))
    return found


def expected_tokens(path, indices=None):
    rows = [json.loads(line) for line in open(path)]
    encoded = [tuple(char_encode(r, None)["input_ids"][:MAX_LENGTH]) for r in rows]
    return encoded if indices is None else [encoded[i] for i in indices]


def test_same_seed_same_batches_and_full_epoch_coverage(data_files):
    train_a, _, stats = build(make_config(data_files))
    train_b, _, stats_b = build(make_config(data_files))
    assert not stats["sources"][0]["from_cache"] and stats_b["sources"][0]["from_cache"]
    steps = train_a.steps_per_epoch
    assert steps == stats["steps_per_epoch"] == -(-stats["train"]["rows"] // 4)
    first = take(train_a, 2 * steps + 1)
    assert same(first, take(train_b, 2 * steps + 1))
    for batch in first:
        assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
        assert all(v.dtype == np.int32 and v.shape == (4, MAX_LENGTH) for v in batch.values())
    epoch0, epoch1 = first[:steps], first[steps : 2 * steps]
    assert collections.Counter(segment_tokens(epoch0)) == collections.Counter(expected_tokens(data_files / "a.jsonl"))
    assert collections.Counter(segment_tokens(epoch1)) == collections.Counter(segment_tokens(epoch0))
    assert not same(epoch0, epoch1), "rows are reshuffled every epoch"
    train_c, _, _ = build(make_config(data_files, seed=4))
    assert not same(take(train_c, steps), epoch0)


@pytest.mark.parametrize("stop_at", [1, "epoch_end"])
def test_resume_continues_with_the_next_batch(data_files, stop_at):
    config = make_config(data_files)
    reference, _, _ = build(config)
    steps = reference.steps_per_epoch
    k = steps - 1 if stop_at == "epoch_end" else stop_at
    expected = take(reference, k + steps + 2)

    interrupted, _, _ = build(config)
    assert same(take(interrupted, k), expected[:k])
    state = json.loads(json.dumps(interrupted.get_state()))
    interrupted.close()

    resumed, _, _ = build(config)
    resumed.set_state(state)
    assert resumed.step == k
    assert same(take(resumed, steps + 2), expected[k:])
    assert resumed.epoch == (k + steps + 2) // steps


def test_state_from_other_data_is_rejected(data_files):
    train, _, _ = build(make_config(data_files))
    other, _, _ = build(make_config(data_files, seed=9))
    with pytest.raises(DataError, match="different data"):
        other.set_state(train.get_state())
    with pytest.raises(DataError, match="not a state"):
        train.set_state({"step": -1})


def test_two_processes_get_disjoint_shares_covering_the_global_batch(data_files):
    config = make_config(data_files, prefetch=0)
    whole, _, _ = build(config, batch=4)
    p0, _, _ = build(config, batch=4, process_index=0, process_count=2)
    p1, _, _ = build(config, batch=4, process_index=1, process_count=2)
    assert p0.local_batch_size == p1.local_batch_size == 2 and p0.steps_per_epoch == whole.steps_per_epoch
    steps = whole.steps_per_epoch
    global_batches = take(whole, steps)
    share0, share1 = take(p0, steps), take(p1, steps)
    for g, a, b in zip(global_batches, share0, share1):
        for key in g:
            assert (np.concatenate([a[key], b[key]]) == g[key]).all()
    resumed_on_two_hosts, _, _ = build(config, batch=4, process_index=1, process_count=2)
    resumed_on_two_hosts.set_state(whole.get_state())
    assert same(take(resumed_on_two_hosts, 2), [b for b in take(p1, 2)])
    tokens0, tokens1 = segment_tokens(share0), segment_tokens(share1)
    everything = collections.Counter(expected_tokens(data_files / "a.jsonl"))
    assert collections.Counter(tokens0) + collections.Counter(tokens1) == everything
    assert not set(tokens0) & set(tokens1)


def test_bad_batch_layout_is_a_config_error(data_files):
    with pytest.raises(ConfigError, match="not divisible"):
        build(make_config(data_files), batch=3, process_index=0, process_count=2)
    with pytest.raises(ConfigError, match="global_batch_size"):
        build(make_config(data_files), batch=0)


def test_eval_fraction_is_split_off_before_packing(data_files, caplog):
    config = make_config(data_files, eval_fraction=0.2)
    with caplog.at_level(logging.INFO, logger="sftjax.data.pipeline"):
        train, evaluation, stats = build(config, batch=4)
    assert "train: packed 72 examples" in caplog.text and "efficiency" in caplog.text
    assert evaluation is not None and stats["eval"]["examples"] == 18 and stats["train"]["examples"] == 72
    train_tokens = segment_tokens(take(train, train.steps_per_epoch))
    eval_batches = list(evaluation)
    eval_tokens = segment_tokens(eval_batches)
    assert len(eval_tokens) == 18 and len(train_tokens) == 72
    assert not set(train_tokens) & set(eval_tokens)
    everything = collections.Counter(expected_tokens(data_files / "a.jsonl"))
    assert collections.Counter(train_tokens + eval_tokens) == everything
    assert same(eval_batches, list(evaluation)), "eval iterates the same batches every time"
    assert all(b["tokens"].shape == (4, MAX_LENGTH) for b in eval_batches)
    rows = stats["eval"]["rows"]
    last = eval_batches[-1]
    padding_rows = len(eval_batches) * 4 - rows
    if padding_rows:
        assert (last["loss_mask"][4 - padding_rows :] == 0).all()
        assert (last["segment_ids"][4 - padding_rows :] == 0).all()


def test_eval_sources_and_two_process_eval(data_files):
    config = make_config(data_files, eval_sources=[str(data_files / "b.jsonl")])
    _, whole, _ = build(config, batch=4)
    _, e0, _ = build(config, batch=4, process_index=0, process_count=2)
    _, e1, _ = build(config, batch=4, process_index=1, process_count=2)
    assert len(e0) == len(e1) == len(whole)
    for g, a, b in zip(whole, e0, e1):
        assert (np.concatenate([a["tokens"], b["tokens"]]) == g["tokens"]).all()
    assert collections.Counter(segment_tokens(whole)) == collections.Counter(expected_tokens(data_files / "b.jsonl"))


def test_mixing_weights_set_examples_per_epoch(data_files):
    config = make_config(data_files, sources=[{"path": str(data_files / "a.jsonl"), "weight": 0.5},
                                              {"path": str(data_files / "b.jsonl"), "weight": 2.5}])
    train, _, stats = build(config)
    assert [s["epoch_examples"] for s in stats["sources"]] == [45, 100]
    tokens = collections.Counter(segment_tokens(take(train, train.steps_per_epoch)))
    b_rows = expected_tokens(data_files / "b.jsonl")
    b_counts = [tokens[t] for t in b_rows]
    assert sorted(collections.Counter(b_counts).items()) == [(2, 20), (3, 20)]
    a_seen = [t for t in expected_tokens(data_files / "a.jsonl") if tokens[t]]
    assert len(a_seen) == 45 and all(tokens[t] == 1 for t in a_seen)


def test_mix_indices_is_seeded():
    a = mix_indices([10, 7], [1.5, 1.0], seed=1)
    assert [x.size for x in a] == [15, 7]
    assert all((x == y).all() for x, y in zip(a, mix_indices([10, 7], [1.5, 1.0], seed=1)))
    assert np.bincount(a[0], minlength=10).min() == 1


def test_real_gsm8k_subset_with_chat_template(assets_dir, tmp_path):
    transformers = require("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))
    lines = open(assets_dir / "datasets" / "gsm8k" / "train.jsonl").readlines()[:64]
    (tmp_path / "gsm8k.jsonl").write_text("".join(lines))
    config = DataConfig.from_dict({
        "sources": [{"path": str(tmp_path / "gsm8k.jsonl"), "columns": {"prompt": "question", "completion": "answer"}}],
        "max_length": 512, "cache_dir": str(tmp_path / "cache"),
    })
    train, _, stats = build_datasets(config, tokenizer, global_batch_size=2, process_index=0, process_count=1)
    assert stats["train"]["examples"] == 64 and stats["train"]["dropped"] == 0
    batch = next(train)
    assert batch["tokens"].shape == (2, 512) and batch["loss_mask"].sum() > 0
    first_row_text = tokenizer.decode(batch["tokens"][0][batch["segment_ids"][0] == 1])
    assert "<|im_start|>assistant" in first_row_text and "####" in first_row_text
