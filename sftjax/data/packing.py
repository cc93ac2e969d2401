"""Packing tokenized examples into fixed ``[rows, max_length]`` batches.

Design in plain words. Every percent of padding is a percent of compute thrown away, so examples are packed
several to a row. Packing is a bin-packing problem over the example lengths:

- ``bfd`` (best-fit decreasing): longest example first, each into the open row whose free space fits it most
  tightly. Rows are kept in buckets by free capacity (an integer in ``[0, max_length]``) with a sorted list of
  the non-empty capacities, so "the tightest row that fits" is one ``bisect``.
- ``best`` (default): the better of two plans. *Exact fill* builds rows one at a time, largest remaining
  example first, and tries to close each row's gap exactly: by one example of exactly the gap's length, else a
  pair summing to it (a vectorized search over a table of available lengths), else a triple (a bounded number
  of first items, each followed by the pair search); only when no exact fill exists does it add the largest
  example that still leaves room for another. This wins when rows hold many examples (GSM8K at 2048: 793 rows
  for a lower bound of 792, BFD 801). *Repaired BFD* runs BFD, then repeatedly empties its emptiest rows into
  a pool and grows every other row from that pool (insert the largest that fits, or swap one of its examples
  for a longer one that fits); the shrunken pool is re-packed with BFD, and rounds go on while rows are saved.
  This wins when rows hold two or three examples (GSM8K at 512: 3239 rows, BFD 3277). Neither is ever worse
  than plain BFD: the row counts are compared and BFD itself is the fallback.
- ``first_fit``: examples in their given order into the first row that has room (a max segment tree over row
  capacities); keeps the data order roughly intact.
- ``none``: one example per row, padded.

Examples longer than ``max_length`` are truncated (keep the start, default), split into ``max_length`` pieces,
or dropped. An example (or piece) with no trained token is dropped and counted: the loss at position ``t``
predicts token ``t+1``, so an example is trained only if some token after its first has ``train_mask`` 1.

The output follows the batch contract of DESIGN.md: int32 ``tokens``, ``targets`` (next token of the same
segment, 0 at a segment's last position), ``loss_mask`` (``train_mask[t+1]``, 0 at the last position),
``segment_ids`` (1, 2, ... per row, 0 on padding) and ``positions`` (restarting at each segment). Everything
after planning is vectorized numpy: no per-token Python loops.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from sftjax.config import OVERFLOWS, PACKINGS
from sftjax.errors import DataError

logger = logging.getLogger(__name__)

STRATEGIES = PACKINGS  # the config's choices (sftjax.config)
OVERFLOW_MODES = OVERFLOWS
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass
class TokenizedExamples:
    """Many tokenized examples stored flat: example ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``.

    Flat storage keeps 100k examples in three arrays (cheap to cache, slice and pack) instead of 200k lists.
    """

    input_ids: np.ndarray  # int32 [total_tokens]
    train_mask: np.ndarray  # uint8 [total_tokens]
    offsets: np.ndarray  # int64 [num_examples + 1]

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.train_mask = np.asarray(self.train_mask, dtype=np.uint8)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.input_ids.shape != self.train_mask.shape or self.offsets[-1] != self.input_ids.size:
            raise DataError("tokenized examples are inconsistent: input_ids, train_mask and offsets disagree")

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, index: int) -> dict[str, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return {"input_ids": self.input_ids[start:end], "train_mask": self.train_mask[start:end]}

    @classmethod
    def empty(cls) -> "TokenizedExamples":
        return cls(np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(1, np.int64))

    @classmethod
    def from_examples(cls, examples: Iterable[Mapping[str, Sequence[int]]]) -> "TokenizedExamples":
        """From dicts with ``input_ids`` and ``train_mask`` (as ``encode_example`` returns them)."""
        ids, masks, lengths = [], [], []
        for i, example in enumerate(examples):
            example_ids = np.asarray(example["input_ids"], dtype=np.int32).reshape(-1)
            example_mask = np.asarray(example["train_mask"], dtype=np.uint8).reshape(-1)
            if example_ids.shape != example_mask.shape:
                raise DataError(
                    f"example {i}: input_ids has {example_ids.size} tokens but train_mask has {example_mask.size}"
                )
            ids.append(example_ids)
            masks.append(example_mask)
            lengths.append(example_ids.size)
        if not ids:
            return cls.empty()
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.concatenate(ids), np.concatenate(masks), offsets)

    @classmethod
    def concatenate(cls, parts: Sequence["TokenizedExamples"]) -> "TokenizedExamples":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        bases = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(parts, bases)])
        return cls(
            np.concatenate([p.input_ids for p in parts]), np.concatenate([p.train_mask for p in parts]), offsets
        )

    def select(self, indices: np.ndarray) -> "TokenizedExamples":
        """The examples at ``indices`` (repeats allowed), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, lengths = self.offsets[indices], self.lengths[indices]
        gather = _ranges(starts, lengths)
        offsets = np.zeros(indices.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenizedExamples(self.input_ids[gather], self.train_mask[gather], offsets)


@dataclasses.dataclass
class PackingStats:
    """What packing did; ``efficiency`` = non-pad tokens / all tokens of the packed rows."""

    examples: int = 0
    rows: int = 0
    max_length: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    split: int = 0
    split_pieces: int = 0
    split_pieces_dropped: int = 0
    dropped: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    strategy: str = ""
    efficiency: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return (
            f"packed {self.examples} examples into {self.rows} rows of {self.max_length} "
            f"({self.strategy}): efficiency {100 * self.efficiency:.2f}%, {self.trained_tokens} trained tokens; "
            f"truncated {self.truncated}, split {self.split}, dropped {self.dropped} "
            f"(too long {self.dropped_too_long}, no trained tokens {self.dropped_no_trained_tokens})"
        )


def _index_dtype(size: int):
    """int32 indices while they fit (half the memory traffic of int64 on large corpora)."""
    return np.int32 if size < 2**31 - 1 else np.int64


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorized."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    segment_begin = np.cumsum(lengths) - lengths
    within = np.arange(total, dtype=np.int64) - np.repeat(segment_begin, lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64), lengths) + within


@dataclasses.dataclass
class Segments:
    """The pieces to pack after overflow handling: ``[start, start + length)`` of the flat token arrays."""

    starts: np.ndarray  # int64 [num_segments]
    lengths: np.ndarray  # int64 [num_segments]


def make_segments(
    examples: TokenizedExamples, max_length: int, overflow: str = "truncate"
) -> tuple[Segments, PackingStats]:
    """Apply the overflow mode and drop untrained pieces; the stats count what happened."""
    if overflow not in OVERFLOW_MODES:
        raise DataError(f"overflow={overflow!r} is not allowed; choose one of {', '.join(OVERFLOW_MODES)}")
    if max_length < 2:
        raise DataError(f"max_length={max_length} is too small to train anything; it must be >= 2")
    stats = PackingStats(examples=len(examples), max_length=max_length)
    starts, lengths = examples.offsets[:-1], examples.lengths
    too_long = lengths > max_length
    if overflow == "truncate":
        stats.truncated = int(too_long.sum())
        lengths = np.minimum(lengths, max_length)
    elif overflow == "drop":
        stats.dropped_too_long = int(too_long.sum())
        starts, lengths = starts[~too_long], lengths[~too_long]
    else:  # split into max_length pieces
        stats.split = int(too_long.sum())
        pieces = -(-lengths // max_length)
        pieces[lengths == 0] = 1
        piece_index = _ranges(np.zeros_like(pieces), pieces)
        example_of_piece = np.repeat(np.arange(lengths.size), pieces)
        piece_starts = starts[example_of_piece] + piece_index * max_length
        piece_lengths = np.minimum(lengths[example_of_piece] - piece_index * max_length, max_length)
        stats.split_pieces = int(pieces[too_long].sum())
        starts, lengths = piece_starts, piece_lengths
    # Trained tokens of a segment = train_mask summed over its tokens after the first.
    mask_cumsum = np.zeros(examples.train_mask.size + 1, _index_dtype(examples.train_mask.size + 1))
    np.cumsum(examples.train_mask, out=mask_cumsum[1:])
    first_trainable = np.minimum(starts + 1, starts + lengths)
    trained = mask_cumsum[starts + lengths] - mask_cumsum[first_trainable]
    untrained = trained == 0
    if overflow == "split":
        # An example counts as dropped only if none of its pieces is trained; dropped pieces are counted apart.
        kept_pieces = np.bincount(example_of_piece[~untrained], minlength=len(examples))
        stats.dropped_no_trained_tokens = int((kept_pieces == 0).sum())
        stats.split_pieces_dropped = int(untrained.sum()) - stats.dropped_no_trained_tokens
    else:
        stats.dropped_no_trained_tokens = int(untrained.sum())
    stats.dropped = stats.dropped_too_long + stats.dropped_no_trained_tokens
    keep = ~untrained
    stats.tokens = int(lengths[keep].sum())
    stats.trained_tokens = int(trained[keep].sum())
    return Segments(starts[keep], lengths[keep]), stats


# ----------------------------------------------------------------------------------------------------------------
# Planners: lengths -> rows (lists of segment indices). Every length is in [1, max_length].


def plan_none(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    return [[i] for i in range(len(lengths))]


def plan_best_fit_decreasing(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Longest first, each into the open row with the least free space that still fits it."""
    order = np.argsort(-lengths, kind="stable").tolist()
    length_list = lengths.tolist()
    smallest = int(lengths.min()) if len(lengths) else 0
    rows: list[list[int]] = []
    rows_by_capacity: list[list[int]] = [[] for _ in range(max_length + 1)]
    open_capacities: list[int] = []  # sorted, distinct, each with a non-empty bucket
    for item in order:
        need = length_list[item]
        k = bisect.bisect_left(open_capacities, need)
        if k < len(open_capacities):
            capacity = open_capacities[k]
            bucket = rows_by_capacity[capacity]
            row = bucket.pop()
            if not bucket:
                del open_capacities[k]
        else:
            row, capacity = len(rows), max_length
            rows.append([])
        rows[row].append(item)
        left = capacity - need
        if left >= smallest:
            bucket = rows_by_capacity[left]
            if not bucket:
                bisect.insort(open_capacities, left)
            bucket.append(row)
    return rows


def plan_first_fit(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """In the given order, each example into the first row with room (max segment tree over capacities)."""
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [max_length] * (2 * size)  # unopened rows have full capacity, so the first free one opens next
    rows: list[list[int]] = []
    for item, need in enumerate(lengths.tolist()):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(item)
        tree[node] -= need
        node //= 2
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node //= 2
    return rows


class _LengthPool:
    """The examples not yet placed, grouped by length, with O(1) 'is this length available' lookups."""

    def __init__(self, lengths: np.ndarray, max_length: int):
        order = np.argsort(lengths, kind="stable")
        self.count = np.bincount(lengths, minlength=max_length + 1).astype(np.int64)
        boundaries = np.cumsum(self.count)[:-1]
        groups = np.split(order, boundaries)
        # Pop from the end: within a length, earlier examples come out first.
        self.items = [g[::-1].tolist() for g in groups]
        self.available = np.flatnonzero(self.count).tolist()  # sorted distinct lengths
        self.has = self.count > 0
        self.size = int(self.count.sum())

    def take(self, length: int) -> int:
        item = self.items[length].pop()
        self.count[length] -= 1
        self.size -= 1
        if not self.items[length]:
            self.has[length] = False
            del self.available[bisect.bisect_left(self.available, length)]
        return item

    def largest_at_most(self, limit: int) -> int | None:
        k = bisect.bisect_right(self.available, limit) - 1
        return self.available[k] if k >= 0 else None

    def pair_summing_to(self, gap: int) -> tuple[int, int] | None:
        """Two available lengths a <= b with a + b == gap, preferring the largest b."""
        low, high = self.available[0], self.available[-1]
        a_min, a_max = max(low, gap - high), gap // 2
        if a_min > a_max:
            return None
        a = np.arange(a_min, a_max + 1)
        ok = self.has[a_min : a_max + 1] & self.has[gap - a]
        if gap % 2 == 0 and a_max >= a_min and self.count[a_max] < 2:
            ok[-1] = False  # a == b needs two examples of that length
        hits = np.flatnonzero(ok)
        if hits.size == 0:
            return None
        first = int(a[hits[0]])
        return first, gap - first


def plan_exact_fill(lengths: np.ndarray, max_length: int, triple_tries: int = 24) -> list[list[int]]:
    """Rows one at a time: largest example first, then close the gap exactly with 1, 2 or 3 examples."""
    pool = _LengthPool(lengths, max_length)
    rows: list[list[int]] = []
    while pool.size:
        first = pool.available[-1]
        row = [pool.take(first)]
        gap = max_length - first
        while gap > 0 and pool.size:
            if pool.has[gap]:
                row.append(pool.take(gap))
                break
            pair = pool.pair_summing_to(gap)
            if pair is not None:
                row.extend(pool.take(length) for length in pair)
                break
            triple = _triple_summing_to(pool, gap, triple_tries)
            if triple is not None:
                row.extend(pool.take(length) for length in triple)
                break
            # No exact fill: add the largest example that leaves room for at least one more, else the largest fit.
            length = pool.largest_at_most(gap - pool.available[0]) or pool.largest_at_most(gap)
            if length is None:
                break
            row.append(pool.take(length))
            gap -= length
        rows.append(row)
    return rows


def _triple_summing_to(pool: _LengthPool, gap: int, tries: int) -> tuple[int, int, int] | None:
    if gap < 3 * pool.available[0] or gap > 3 * pool.available[-1]:
        return None
    k = bisect.bisect_right(pool.available, gap - 2 * pool.available[0]) - 1
    for first in reversed(pool.available[max(0, k - tries + 1) : k + 1]):
        if pool.count[first] == 0:
            continue
        pool.count[first] -= 1  # so the pair search cannot reuse the same example
        had = pool.has[first]
        pool.has[first] = pool.count[first] > 0
        pair = pool.pair_summing_to(gap - first) if pool.size > 1 else None
        pool.count[first] += 1
        pool.has[first] = had
        if pair is not None:
            return first, pair[0], pair[1]
    return None


def repack_emptiest_rows(lengths: np.ndarray, max_length: int, rows: list[list[int]], dissolve: int,
                         passes: int = 3) -> list[list[int]]:
    """One improvement round: empty the ``dissolve`` emptiest rows into a pool, then grow every other row.

    A row grows by taking the largest pool example that fits its gap, or by swapping one of its examples for
    a longer pool example that still fits (the shorter one goes back to the pool). Each move shrinks the pool's
    total, so the pool left at the end (re-packed by BFD) needs fewer rows than were dissolved.
    """
    length_of = lengths.tolist()
    rows = [list(r) for r in rows]
    fill = [sum(length_of[i] for i in r) for r in rows]
    by_fill = sorted(range(len(rows)), key=fill.__getitem__)
    dissolved = set(by_fill[:dissolve])
    pool = sorted((length_of[i], i) for r in dissolved for i in rows[r])
    pool_lengths = [length for length, _ in pool]
    pool_items = [item for _, item in pool]
    kept = [r for r in by_fill if r not in dissolved]
    for _ in range(passes):
        changed = False
        for r in kept:
            gap = max_length - fill[r]
            while gap > 0 and pool_lengths:
                k = bisect.bisect_right(pool_lengths, gap) - 1
                gain, take, replace = (pool_lengths[k], k, None) if k >= 0 else (0, None, None)
                for position, item in enumerate(rows[r]):
                    own = length_of[item]
                    k = bisect.bisect_right(pool_lengths, own + gap) - 1
                    if k >= 0 and pool_lengths[k] - own > gain:
                        gain, take, replace = pool_lengths[k] - own, k, position
                if take is None:
                    break
                del pool_lengths[take]
                new_item = pool_items.pop(take)
                if replace is None:
                    rows[r].append(new_item)
                else:
                    old_item = rows[r][replace]
                    rows[r][replace] = new_item
                    k = bisect.bisect_left(pool_lengths, length_of[old_item])
                    pool_lengths.insert(k, length_of[old_item])
                    pool_items.insert(k, old_item)
                fill[r] += gain
                gap -= gain
                changed = True
        if not changed:
            break
    rest = np.asarray(pool_items, dtype=np.int64)
    repacked = plan_best_fit_decreasing(lengths[rest], max_length) if rest.size else []
    return [rows[r] for r in sorted(kept)] + [[int(rest[i]) for i in row] for row in repacked]


def plan_repaired_bfd(lengths: np.ndarray, max_length: int, rounds: int = 8) -> list[list[int]]:
    """BFD, then rounds of :func:`repack_emptiest_rows` while they save rows."""
    rows = plan_best_fit_decreasing(lengths, max_length)
    lower_bound = -(-int(lengths.sum()) // max_length)
    for _ in range(rounds):
        excess = len(rows) - lower_bound
        if excess <= 0:
            break
        improved = repack_emptiest_rows(lengths, max_length, rows, dissolve=max(8, excess))
        if len(improved) >= len(rows):
            break
        rows = improved
    return rows


def plan_rows(lengths: np.ndarray, max_length: int, strategy: str = "best") -> list[list[int]]:
    """Group segment indices into rows whose lengths sum to at most ``max_length``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if strategy not in STRATEGIES:
        raise DataError(f"packing={strategy!r} is not allowed; choose one of {', '.join(STRATEGIES)}")
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_length):
        raise DataError(f"segment lengths must be in [1, {max_length}] before planning")
    if lengths.size == 0:
        return []
    if strategy == "none":
        return plan_none(lengths, max_length)
    if strategy == "first_fit":
        return plan_first_fit(lengths, max_length)
    if strategy == "bfd":
        return plan_best_fit_decreasing(lengths, max_length)
    exact = plan_exact_fill(lengths, max_length)
    lower_bound = -(-int(lengths.sum()) // max_length)
    if len(exact) <= lower_bound + lower_bound // 1000:
        return exact  # within 0.1% of the bound: repairing BFD cannot win enough to pay for itself
    repaired = plan_repaired_bfd(lengths, max_length)
    return exact if len(exact) <= len(repaired) else repaired


# ----------------------------------------------------------------------------------------------------------------
# Materialization: plan -> batch arrays.


@dataclasses.dataclass
class PackedPlan:
    """Rows as lists of segments, kept compact; ``materialize`` builds any subset of rows on demand."""

    examples: TokenizedExamples
    segment_starts: np.ndarray  # int64 [num_segments], in row order
    segment_lengths: np.ndarray  # int64 [num_segments], in row order
    row_first_segment: np.ndarray  # int64 [num_rows + 1]
    max_length: int

    @property
    def num_rows(self) -> int:
        return self.row_first_segment.size - 1

    def materialize(self, row_indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Batch arrays ``[len(row_indices), max_length]``; an index of -1 gives an all-padding row."""
        if row_indices is None:
            row_indices = np.arange(self.num_rows)
        row_indices = np.asarray(row_indices, dtype=np.int64)
        padding_row = row_indices < 0
        safe_rows = np.where(padding_row, 0, row_indices)
        counts = np.where(padding_row, 0, self.row_first_segment[safe_rows + 1] - self.row_first_segment[safe_rows])
        segments = _ranges(self.row_first_segment[safe_rows], counts)
        return _fill_rows(
            self.examples, self.segment_starts[segments], self.segment_lengths[segments], counts, self.max_length
        )


def _fill_rows(
    examples: TokenizedExamples, starts: np.ndarray, lengths: np.ndarray, counts: np.ndarray, max_length: int
) -> dict[str, np.ndarray]:
    """Segments (in row order, ``counts`` per row) -> batch arrays.

    Each row is filled from its start with no holes, so the row-major order of the non-padding cells is exactly
    the concatenation of the segments: one boolean-mask assignment per key places every token.
    """
    num_rows = counts.size
    batch = {key: np.zeros((num_rows, max_length), np.int32) for key in BATCH_KEYS}
    if lengths.size == 0:
        return batch
    total = int(lengths.sum())
    row_of_segment = np.repeat(np.arange(num_rows), counts)
    used_per_row = np.bincount(row_of_segment, weights=lengths, minlength=num_rows).astype(np.int64)
    occupied = np.arange(max_length)[None, :] < used_per_row[:, None]

    segment_begin = np.cumsum(lengths) - lengths  # within the concatenation of all segments
    segment_last = segment_begin + lengths - 1
    first_segment_of_row = np.cumsum(counts) - counts
    segment_rank = (np.arange(lengths.size) - first_segment_of_row[row_of_segment] + 1).astype(np.int32)

    index_dtype = _index_dtype(examples.input_ids.size + total)
    source = np.repeat((starts - segment_begin).astype(index_dtype), lengths)
    source += np.arange(total, dtype=index_dtype)
    batch["tokens"][occupied] = examples.input_ids[source]
    following = source
    following += 1  # in place: `source` is not needed any more
    np.minimum(following, examples.input_ids.size - 1, out=following)
    del source
    targets = examples.input_ids[following]
    targets[segment_last] = 0  # the next token belongs to another segment (or none)
    batch["targets"][occupied] = targets
    del targets
    loss_mask = examples.train_mask[following]
    del following
    loss_mask[segment_last] = 0
    batch["loss_mask"][occupied] = loss_mask
    del loss_mask
    batch["segment_ids"][occupied] = np.repeat(segment_rank, lengths)
    positions = np.arange(total, dtype=np.int32) - np.repeat(segment_begin.astype(np.int32), lengths)
    batch["positions"][occupied] = positions
    return batch


def plan(
    encoded_examples, max_length: int, strategy: str = "best", overflow: str = "truncate"
) -> tuple[PackedPlan, PackingStats]:
    """Overflow handling + row planning, without building the arrays (the pipeline builds batches lazily)."""
    examples = (
        encoded_examples
        if isinstance(encoded_examples, TokenizedExamples)
        else TokenizedExamples.from_examples(encoded_examples)
    )
    segments, stats = make_segments(examples, max_length, overflow)
    rows = plan_rows(segments.lengths, max_length, strategy)
    counts = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    order = np.fromiter((i for r in rows for i in r), np.int64, int(counts.sum()))
    row_first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    packed = PackedPlan(examples, segments.starts[order], segments.lengths[order], row_first, max_length)
    stats.rows = len(rows)
    stats.strategy = strategy
    stats.efficiency = stats.tokens / (stats.rows * max_length) if stats.rows else 0.0
    return packed, stats


def pack(
    encoded_examples,
    max_length: int,
    strategy: str = "best",
    overflow: str = "truncate",
    seed: int | None = None,
) -> tuple[dict[str, np.ndarray], PackingStats]:
    """Pack examples into a batch dict of int32 ``[num_rows, max_length]`` arrays (rows shuffled if ``seed``).

    ``encoded_examples``: dicts with ``input_ids``/``train_mask`` (as ``encode_example`` returns), or a
    :class:`TokenizedExamples`.
    """
    packed, stats = plan(encoded_examples, max_length, strategy, overflow)
    rows = np.arange(packed.num_rows)
    if seed is not None:
        rows = np.random.default_rng(seed).permutation(packed.num_rows)
    logger.info(stats.summary())
    return packed.materialize(rows), stats
