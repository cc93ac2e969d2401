"""Packing speed and efficiency of every strategy, on real GSM8K and on 100,000 resampled examples.

GSM8K train (7,473 question -> answer examples) is encoded with the SmolLM2 tokenizer and chat template through
``encode_example``; the synthetic set resamples those lengths 100,000 times (random token ids, the prompt part
untrained). Each strategy is timed on one core as planning (deciding the rows) and materialization (building
the five int32 arrays), and its rows, efficiency (non-pad / all tokens) and the lower bound
ceil(tokens / max_length) are recorded. Run: ``python benchmarks/bench_packing.py`` (writes
``benchmarks/results/packing_gsm8k.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from sftjax.data.packing import STRATEGIES, TokenizedExamples, make_segments, plan  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
MATERIALIZE_LIMIT_CELLS = 2**26  # skip building outputs over 256 MiB per key (e.g. 'none' at 2048: one row each)


def gsm8k_examples(assets: pathlib.Path) -> TokenizedExamples:
    from transformers import AutoTokenizer

    from sftjax.data.chat import encode_example

    tokenizer = AutoTokenizer.from_pretrained(str(assets / "tokenizers" / "smollm2"))
    rows = [json.loads(line) for line in open(assets / "datasets" / "gsm8k" / "train.jsonl")]
    return TokenizedExamples.from_examples(
        encode_example({"prompt": r["question"], "completion": r["answer"]}, tokenizer, masking="completion")
        for r in rows
    )


def resampled(real: TokenizedExamples, count: int, seed: int = 0) -> TokenizedExamples:
    """``count`` examples with the real examples' lengths and prompt lengths, random token ids."""
    rng = np.random.default_rng(seed)
    real_position = np.arange(real.input_ids.size) - np.repeat(real.offsets[:-1], real.lengths)
    untrained_position = np.where(real.train_mask > 0, real_position, np.iinfo(np.int64).max)
    prompt_lengths = np.minimum.reduceat(untrained_position, real.offsets[:-1])
    picked = rng.integers(0, len(real), count)
    lengths, prompts = real.lengths[picked], prompt_lengths[picked]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(1, 49152, int(offsets[-1])).astype(np.int32)
    position = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], lengths)
    mask = (position >= np.repeat(prompts, lengths)).astype(np.uint8)
    return TokenizedExamples(ids, mask, offsets)


def measure(examples: TokenizedExamples, max_length: int, strategy: str) -> dict:
    """Wall and CPU seconds (CPU time is what one core spends; the shared machine inflates wall time)."""
    wall, cpu = time.perf_counter(), time.process_time()
    packed, stats = plan(examples, max_length, strategy)
    plan_s, plan_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    materialize_s = materialize_cpu_s = None
    if packed.num_rows * max_length <= MATERIALIZE_LIMIT_CELLS:
        wall, cpu = time.perf_counter(), time.process_time()
        batch = packed.materialize(np.random.default_rng(0).permutation(packed.num_rows))
        materialize_s, materialize_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        assert int((batch["segment_ids"] > 0).sum()) == stats.tokens
        del batch
    segments, _ = make_segments(examples, max_length)
    lower_bound = -(-int(segments.lengths.sum()) // max_length)

    def rounded(x):
        return None if x is None else round(x, 3)

    return {
        "strategy": strategy, "max_length": max_length, "examples": len(examples), "rows": stats.rows,
        "lower_bound_rows": lower_bound, "efficiency": round(stats.efficiency, 6),
        "truncated": stats.truncated, "dropped": stats.dropped,
        "plan_s": rounded(plan_s), "materialize_s": rounded(materialize_s),
        "total_s": rounded(None if materialize_s is None else plan_s + materialize_s),
        "plan_cpu_s": rounded(plan_cpu_s), "materialize_cpu_s": rounded(materialize_cpu_s),
        "total_cpu_s": rounded(None if materialize_cpu_s is None else plan_cpu_s + materialize_cpu_s),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default=os.environ.get("SFTJAX_ASSETS", str(REPO.parent / "shared" / "assets")))
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "packing_gsm8k.json"))
    args = parser.parse_args()

    real = gsm8k_examples(pathlib.Path(args.assets))
    synthetic = resampled(real, args.count)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
               "gsm8k": [], "resampled": []}
    for name, examples in (("gsm8k", real), ("resampled", synthetic)):
        for max_length in (2048, 512):
            for strategy in STRATEGIES:
                row = measure(examples, max_length, strategy)
                results[name].append(row)
                print(f"{name:9s} L={max_length:5d} {strategy:9s} rows={row['rows']:7d} "
                      f"(bound {row['lower_bound_rows']}) "
                      f"eff={100 * row['efficiency']:.2f}% plan={row['plan_s']}s (cpu {row['plan_cpu_s']}s) "
                      f"materialize={row['materialize_s']}s (cpu {row['materialize_cpu_s']}s)", flush=True)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
