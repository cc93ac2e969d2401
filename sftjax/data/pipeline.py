"""From a DataConfig to host-local training and eval batches, on grain.

Design in plain words:

1. Each source is tokenized (in parallel, cached on disk: ``cache.py``). Eval data is either the
   ``eval_sources`` or an ``eval_fraction`` of every training source, split off with the seed *before* packing,
   so no example is in both.
2. Sources are mixed by weight: a source with weight ``w`` and ``n`` examples contributes ``round(w * n)``
   examples per epoch (``floor`` full copies plus a seeded sample of the rest), fixed for the run so that every
   epoch has the same number of steps.
3. The whole training set is packed once (``packing.py``; global view = best efficiency). The plan is compact;
   batch arrays are built on demand.
4. The global batch for step ``s`` is a pure function of ``s``: epoch ``s // steps_per_epoch`` picks a seeded
   permutation of the rows, and the step takes the next ``global_batch_size`` of them (the last batch of an
   epoch is completed with all-padding rows, which carry no loss, so no row is ever skipped). Process ``p`` of
   ``P`` builds only its contiguous ``global_batch_size / P`` rows of each batch: every process computes the
   same plan and reads a disjoint share, and the shares together cover the global batch in order (the layout
   ``jax.make_array_from_process_local_data`` expects).
5. grain turns that index -> batch function into an iterator with background prefetch threads and a
   checkpointable state. Because batches depend only on the step index, the state is just the next step, and
   a restored iterator continues with exactly the batch that would have come next, across epoch boundaries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator

import grain
import numpy as np

from sftjax.data.cache import TokenizedSource, tokenize_source
from sftjax.data.packing import PackedPlan, PackingStats, TokenizedExamples, plan
from sftjax.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _process_layout(global_batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ConfigError(f"global_batch_size={global_batch_size!r} must be a positive integer")
    if global_batch_size % process_count:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not divisible by the number of processes ({process_count})"
        )
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} must be in [0, {process_count})")
    return process_index, process_count


class _RowBatches:
    """Global step -> host-local batch, a pure function of the step (shared by train and eval)."""

    def __init__(self, packed: PackedPlan, global_batch_size: int, process_index: int, process_count: int,
                 seed: int, shuffle: bool):
        self.packed = packed
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.local_offset = process_index * self.local_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = -(-packed.num_rows // global_batch_size)
        self._orders: dict[int, np.ndarray] = {}  # the last epochs' row orders (prefetch threads may span two)
        self._lock = threading.Lock()

    def row_order(self, epoch: int) -> np.ndarray:
        """The rows in the order epoch ``epoch`` visits them, padded with -1 (all-padding rows)."""
        with self._lock:
            if epoch not in self._orders:
                if len(self._orders) >= 3:
                    del self._orders[min(self._orders)]
                self._orders[epoch] = self._compute_order(epoch)
            return self._orders[epoch]

    def _compute_order(self, epoch: int) -> np.ndarray:
        order = np.arange(self.packed.num_rows)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.packed.num_rows)
        padding = self.steps_per_epoch * self.global_batch_size - order.size
        return np.concatenate([order, np.full(padding, -1, np.int64)])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, within = divmod(step, self.steps_per_epoch)
        begin = within * self.global_batch_size + self.local_offset
        return self.packed.materialize(self.row_order(epoch)[begin : begin + self.local_batch_size])


class TrainData:
    """An endless iterator of host-local training batches (dict of int32 ``[local_rows, max_length]``).

    ``get_state()`` returns a JSON-serializable dict; ``set_state(state)`` (also on a freshly built TrainData)
    makes the next batch the one that followed when the state was taken.
    """

    def __init__(self, rows: _RowBatches, stats: PackingStats, prefetch: int, fingerprint: str):
        self._rows = rows
        self.stats = stats
        self.prefetch = prefetch
        self.fingerprint = fingerprint
        self._next_step = 0
        self._iterator = None

    steps_per_epoch = property(lambda self: self._rows.steps_per_epoch)
    local_batch_size = property(lambda self: self._rows.local_batch_size)
    global_batch_size = property(lambda self: self._rows.global_batch_size)
    step = property(lambda self: self._next_step, doc="The global step of the next batch.")
    epoch = property(lambda self: self._next_step // self._rows.steps_per_epoch)

    def _dataset(self) -> grain.IterDataset:
        steps = grain.MapDataset.range(self._rows.steps_per_epoch).repeat(None)
        dataset = steps.map_with_index(lambda step, _: self._rows.batch(step))
        threads = max(1, self.prefetch)
        return dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.prefetch))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(self._dataset())
            if self._next_step:
                self._iterator.set_state({"next_index": self._next_step})
        batch = next(self._iterator)
        self._next_step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._next_step, "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
            raise DataError(f"data iterator state {state!r} is not a state saved by TrainData.get_state()")
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                "data iterator state was saved for different data (sources, tokenizer, seed, packing or batch size "
                "changed); resuming would not continue the same batches"
            )
        self.close()
        self._next_step = state["step"]

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


class EvalData:
    """The eval batches, once per iteration, in a fixed order; the last batch is completed with padding rows.
    ``examples`` are the eval split's tokenized examples before packing (generation-based evaluation)."""

    def __init__(self, rows: _RowBatches, stats: PackingStats, examples: TokenizedExamples | None = None):
        self._rows = rows
        self.stats = stats
        self.examples = examples

    @property
    def num_batches(self) -> int:
        return self._rows.steps_per_epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for step in range(self.num_batches):
            yield self._rows.batch(step)


# ----------------------------------------------------------------------------------------------------------------


def mix_indices(sizes: list[int], weights: list[float], seed: int) -> list[np.ndarray]:
    """Per source, which of its examples an epoch uses: ``round(weight * size)`` of them (copies + a sample)."""
    rng = np.random.default_rng([seed, 0x6D6978])
    chosen = []
    for size, weight in zip(sizes, weights):
        count = int(round(weight * size))
        copies, rest = divmod(count, size) if size else (0, 0)
        sample = np.sort(rng.choice(size, rest, replace=False)) if rest else np.zeros(0, np.int64)
        chosen.append(np.concatenate([np.tile(np.arange(size), copies), sample]).astype(np.int64))
    return chosen


def split_eval(examples: TokenizedExamples, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indices, eval indices) of one source; eval gets ``round(fraction * n)`` examples."""
    n = len(examples)
    eval_count = int(round(fraction * n))
    if fraction > 0 and n > 1:
        eval_count = min(max(eval_count, 1), n - 1)
    order = np.random.default_rng([seed, 0x6576616C, salt]).permutation(n)
    return np.sort(order[eval_count:]), np.sort(order[:eval_count])


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _examples_digest(examples: TokenizedExamples) -> str:
    digest = hashlib.sha256()
    for array in (examples.offsets, examples.input_ids, examples.train_mask):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def build_datasets(
    data_config,
    tokenizer,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    encode_fn: Callable | None = None,
) -> tuple[TrainData, EvalData | None, dict]:
    """Tokenize (cached), split, mix and pack; -> (train data, eval data or None, stats dict).

    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``;
    ``encode_fn`` replaces :func:`sftjax.data.chat.encode_example` (tests).
    """
    process_index, process_count = _process_layout(global_batch_size, process_index, process_count)
    cfg = data_config

    def tokenize(source) -> TokenizedSource:
        return tokenize_source(
            source, tokenizer, masking=cfg.masking, chat_template=cfg.chat_template, on_bad_row=cfg.on_bad_row,
            train_reasoning=cfg.train_reasoning,
            num_workers=cfg.num_workers, cache_dir=cfg.cache_dir, encode_fn=encode_fn,
        )

    train_sources = [tokenize(source) for source in cfg.sources]
    for source, tokenized in zip(cfg.sources, train_sources):
        if len(tokenized.examples) == 0:
            raise DataError(f"{source.path}: no usable examples (dropped: {tokenized.dropped})")

    train_parts, eval_parts = [], []
    if cfg.eval_sources:
        if cfg.eval_fraction > 0:
            logger.warning("data.eval_fraction=%s is ignored because data.eval_sources are given", cfg.eval_fraction)
        eval_parts = [tokenize(source).examples for source in cfg.eval_sources]
        train_parts = [t.examples for t in train_sources]
    elif cfg.eval_fraction > 0:
        for salt, tokenized in enumerate(train_sources):
            train_idx, eval_idx = split_eval(tokenized.examples, cfg.eval_fraction, cfg.seed, salt)
            train_parts.append(tokenized.examples.select(train_idx))
            eval_parts.append(tokenized.examples.select(eval_idx))
    else:
        train_parts = [t.examples for t in train_sources]

    weights = [source.weight for source in cfg.sources]
    chosen = mix_indices([len(p) for p in train_parts], weights, cfg.seed)
    train_examples = TokenizedExamples.concatenate([p.select(c) for p, c in zip(train_parts, chosen)])

    train_plan, train_stats = plan(train_examples, cfg.max_length, cfg.packing, cfg.overflow)
    if train_plan.num_rows == 0:
        raise DataError("no training example is left to train on after overflow handling and drops")
    logger.info("train: %s", train_stats.summary())
    train_rows = _RowBatches(train_plan, global_batch_size, process_index, process_count, cfg.seed, cfg.shuffle)
    fingerprint = _fingerprint(
        _examples_digest(train_examples), cfg.max_length, cfg.packing, cfg.overflow, cfg.seed, cfg.shuffle,
        global_batch_size,
    )  # not the process count: the global batches do not depend on it, so a run may resume on more or fewer hosts
    train = TrainData(train_rows, train_stats, cfg.prefetch, fingerprint)

    evaluation, eval_stats = None, None
    eval_examples = TokenizedExamples.concatenate(eval_parts)
    if len(eval_examples):
        eval_plan, eval_stats = plan(eval_examples, cfg.max_length, cfg.packing, cfg.overflow)
        logger.info("eval: %s", eval_stats.summary())
        if eval_plan.num_rows:
            evaluation = EvalData(
                _RowBatches(eval_plan, global_batch_size, process_index, process_count, cfg.seed, shuffle=False),
                eval_stats, examples=eval_examples,
            )

    stats = {
        "train": train_stats.as_dict(),
        "eval": eval_stats.as_dict() if eval_stats else None,
        "steps_per_epoch": train.steps_per_epoch,
        "global_batch_size": global_batch_size,
        "local_batch_size": train.local_batch_size,
        "eval_batches": evaluation.num_batches if evaluation else 0,
        "sources": [
            {"path": t.path, "examples": len(t.examples), "weight": s.weight, "epoch_examples": int(c.size),
             "dropped": t.dropped, "from_cache": t.from_cache}
            for t, s, c in zip(train_sources, cfg.sources, chosen)
        ],
    }
    return train, evaluation, stats
