"""Synthetic packed batches for the benchmarks (numpy only: the PyTorch and the JAX side both use them)."""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def packed_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch-contract arrays: 2-3 segments per row filling ~97% of it, the second half of each segment trained
    (a prompt -> completion shape), targets the next token within the segment."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((rows, length), np.int32) for k in BATCH_KEYS}
    margin = max(1, min(32, length // 8))
    for row in range(rows):
        count = int(rng.integers(2, 4))
        used = int(length * rng.uniform(0.95, 1.0))
        cuts = np.sort(rng.choice(np.arange(margin, used - margin), count - 1, replace=False))
        bounds = [0, *cuts.tolist(), used]
        for segment, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            tokens = rng.integers(1, vocab, stop - start)
            batch["tokens"][row, start:stop] = tokens
            batch["targets"][row, start:stop - 1] = tokens[1:]
            prompt = (stop - start) // 2
            batch["loss_mask"][row, start + prompt:stop - 1] = 1
            batch["segment_ids"][row, start:stop] = segment
            batch["positions"][row, start:stop] = np.arange(stop - start)
    return batch
