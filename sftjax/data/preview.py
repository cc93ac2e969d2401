"""``sftjax data preview CONFIG``: see exactly what the model will be trained on before training.

Reads the ``data:`` section of a run config (or a YAML that is just the data section), encodes every row of the
training sources with the same code the trainer uses, and prints a few rendered examples with the trained tokens
highlighted (colour in a terminal, ``[[...]]`` when piped) followed by a summary: rows read / kept / dropped by
reason, tokens, trained tokens, truncations, packing efficiency and a length histogram. ``--format jsonl``
prints one JSON object per example (``input_ids``, ``train_mask``) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from rich.console import Console
from rich.text import Text

from sftjax.config import DataConfig, load_config
from sftjax.data.chat import encode_rows
from sftjax.data.packing import pack
from sftjax.data.sources import iter_rows
from sftjax.errors import ConfigError
from sftjax.models.tokenizer import load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["preview"], help="what to do with the data (preview)")
    parser.add_argument("config", help="YAML run config with a data: section, or just the data section")
    parser.add_argument("-n", "--num-examples", type=int, default=3, help="examples to print (default 3)")
    parser.add_argument("--format", choices=["text", "jsonl"], default="text",
                        help="text: highlighted examples + summary; jsonl: one JSON object per example")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or model alias (overrides the config)")
    parser.add_argument("--limit", type=int, default=None, help="read at most this many rows per source")


def load_preview_config(path: str) -> tuple[DataConfig, str | None]:
    """(DataConfig, tokenizer path or alias) from a run config or a YAML that is just the data section, loaded
    through :func:`sftjax.config.load_config` like every other command."""
    cfg = load_config(path, purpose="data")
    return cfg.data, cfg.tokenizer.path or cfg.model.path


def encode_sources(config: DataConfig, tokenizer, limit: int | None = None):
    """Encode every training row; returns (examples with locations, rows read, Counter of drop reasons)."""
    examples, drops, rows_read = [], Counter(), 0
    for source in config.sources:
        def counted(source=source):
            nonlocal rows_read
            for index, item in enumerate(iter_rows(source)):
                if limit is not None and index >= limit:
                    return
                rows_read += 1
                yield item
        located = []

        def remember(source_rows):
            for location, row in source_rows:
                located.append(location)
                yield location, row
        encoded, source_drops = encode_rows(
            remember(counted()), tokenizer, on_bad_row=config.on_bad_row, masking=config.masking,
            train_reasoning=config.train_reasoning,
            chat_template=config.chat_template, format=source.format, columns=source.columns,
            system_prompt=source.system_prompt)
        for example in encoded:
            examples.append((located[-1], example))
        drops.update(source_drops)
    return examples, rows_read, drops


def highlight_runs(tokenizer, input_ids: list[int], train_mask: list[int]) -> list[tuple[str, bool]]:
    """(text, trained) pieces: contiguous tokens with the same mask decoded together (keeps UTF-8 intact)."""
    pieces, start = [], 0
    for t in range(1, len(input_ids) + 1):
        if t == len(input_ids) or train_mask[t] != train_mask[start]:
            pieces.append((tokenizer.decode(input_ids[start:t]), bool(train_mask[start])))
            start = t
    return pieces


def _histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    if not lengths:
        return []
    top = max(max(lengths), 1)
    edges = [round(top * k / bins) for k in range(bins + 1)]
    counts = [0] * bins
    for length in lengths:
        counts[min(bins - 1, max(0, (length * bins - 1) // top))] += 1
    peak = max(counts)
    lines = []
    for k in range(bins):
        bar = "#" * (round(width * counts[k] / peak) if peak else 0)
        marker = "  > max_length" if edges[k] >= max_length else ""
        lines.append(f"  {edges[k] + 1:>7}-{edges[k + 1]:<7} {counts[k]:>7} {bar}{marker}")
    return lines


def run(args) -> int:
    config, tokenizer_name = load_preview_config(args.config)
    if not (args.tokenizer or tokenizer_name):
        raise ConfigError("no tokenizer: add tokenizer.path or model.path to the config, or pass --tokenizer")
    tokenizer = load_tokenizer(args.tokenizer or tokenizer_name)
    examples, rows_read, drops = encode_sources(config, tokenizer, args.limit)
    shown = examples[: max(0, args.num_examples)]
    if args.format == "jsonl":
        for location, example in shown:
            print(json.dumps({"location": location, "input_ids": example["input_ids"],
                              "train_mask": example["train_mask"]}))
        return 0

    console = Console(highlight=False, soft_wrap=True)
    terminal = sys.stdout.isatty()
    for location, example in shown:
        console.rule(f"{location}  ({len(example['input_ids'])} tokens, {sum(example['train_mask'])} trained)")
        text = Text()
        for piece, trained in highlight_runs(tokenizer, example["input_ids"], example["train_mask"]):
            if terminal:
                text.append(piece, style="bold black on green" if trained else "dim")
            else:
                text.append(f"[[{piece}]]" if trained else piece)
        console.print(text)

    stats = None
    if examples:
        _, stats = pack([e for _, e in examples], config.max_length, strategy=config.packing,
                        overflow=config.overflow, seed=None)
    lengths = [len(e["input_ids"]) for _, e in examples]
    console.rule("summary")
    lines = [
        f"rows read: {rows_read}",
        f"examples kept: {len(examples)}",
        f"dropped while encoding: {sum(drops.values())}" + (
            f" ({', '.join(f'{reason}: {n}' for reason, n in sorted(drops.items()))})" if drops else ""),
        f"tokens: {sum(lengths)}  trained tokens: {sum(sum(e['train_mask']) for _, e in examples)}",
    ]
    if stats is not None:
        lines += [
            f"max_length {config.max_length}, overflow={config.overflow}: truncated {stats.truncated}, "
            f"split {stats.split}, dropped {stats.dropped} (too long {stats.dropped_too_long}, "
            f"no trained tokens {stats.dropped_no_trained_tokens})",
            f"packing ({stats.strategy}): {stats.examples} examples -> {stats.rows} rows, "
            f"efficiency {100 * stats.efficiency:.2f}%, trained tokens after packing {stats.trained_tokens}",
        ]
    lines.append("length histogram (tokens per example):")
    lines += _histogram(lengths, config.max_length)
    for line in lines:
        console.print(line)
    return 0
