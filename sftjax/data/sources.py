"""Reading rows from local dataset files.

``iter_rows(source)`` yields ``(location, row)`` pairs, where ``location`` names the file and the 1-based line
(JSON lines, CSV) or row (JSON list, Parquet, ``datasets`` directories) so that any later error about the row can
point at it. Supported: ``.jsonl``/``.ndjson``, ``.json`` (a list of rows, a wrapper object whose list sits under
``json_field``, or a single object that is one row), ``.parquet``, ``.csv``/``.tsv``, and directories written by
``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (pick one with ``split``).
Rows are streamed where the format allows it (JSON lines, CSV, Parquet batches, Arrow datasets).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator

from sftjax.config import SourceConfig
from sftjax.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")


def iter_rows(source: SourceConfig | str) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, row)`` for every row of ``source``; raise DataError on a missing/empty/broken file."""
    if isinstance(source, str):
        source = SourceConfig(path=source)
    path = source.path
    if not os.path.exists(path):
        raise DataError(f"{path}: dataset file or directory does not exist")
    if os.path.isdir(path):
        rows = _iter_saved_dataset(path, source.split)
    else:
        lower = path.lower()
        if lower.endswith(JSONL_SUFFIXES):
            rows = _iter_jsonl(path)
        elif lower.endswith(".json"):
            rows = _iter_json(path, source.json_field)
        elif lower.endswith(".parquet"):
            rows = _iter_parquet(path)
        elif lower.endswith(CSV_SUFFIXES):
            rows = _iter_csv(path)
        else:
            raise DataError(
                f"{path}: unsupported file type; use .jsonl, .json, .parquet, .csv or a datasets.save_to_disk directory"
            )
    count = 0
    for location, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{location}: row is a {type(row).__name__}, expected a JSON object with named columns")
        count += 1
        yield location, row
    if count == 0:
        raise DataError(f"{path}: dataset is empty (no rows)")


def _iter_jsonl(path: str) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: malformed JSON line ({err.msg} at column {err.colno})") from None
            yield f"{path}:{line_number}", row


def _iter_json(path: str, json_field: str | None) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and json_field is None:  # JSON lines saved with a .json name
            yield from _iter_jsonl(path)
            return
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if json_field is not None:
        if not isinstance(data, dict) or json_field not in data:
            keys = ", ".join(map(str, data)) if isinstance(data, dict) else f"a {type(data).__name__}"
            raise DataError(f"{path}: json_field {json_field!r} not found at the top level (found: {keys})")
        data = data[json_field]
        if not isinstance(data, list):
            raise DataError(f"{path}: json_field {json_field!r} holds a {type(data).__name__}, expected a list of rows")
    elif isinstance(data, dict):
        wrapped = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        row_like = {"messages", "conversations", "instruction", "prompt", "text", "question"}
        if len(data) == 1 and wrapped and wrapped[0] not in row_like:
            raise DataError(f"{path}: top-level object wraps a list under {wrapped[0]!r}; set json_field: {wrapped[0]}")
        data = [data]  # a single object is one row
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is a {type(data).__name__}, expected a list of rows or an object")
    for index, row in enumerate(data, start=1):
        yield f"{path}:{index}", row


def _iter_parquet(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({str(err).splitlines()[0]})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            yield f"{path}:{index}", row


def _iter_csv(path: str) -> Iterator[tuple[str, object]]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            return
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: row has more fields than the header")
            yield f"{path}:{reader.line_num}", row


def _iter_saved_dataset(path: str, split: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as err:
        raise DataError(f"{path}: not a datasets.save_to_disk directory ({str(err).splitlines()[0]})") from None
    label = path
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None:
            if len(splits) != 1:
                raise DataError(f"{path}: holds splits {', '.join(splits)}; set split: to one of them")
            split = splits[0]
        if split not in loaded:
            raise DataError(f"{path}: split {split!r} not found; available: {', '.join(splits)}")
        loaded = loaded[split]
        label = f"{path}[{split}]"
    elif split is not None:
        raise DataError(f"{path}: split {split!r} given but the directory holds a single dataset without splits")
    for index, row in enumerate(loaded, start=1):
        yield f"{label}:{index}", row
