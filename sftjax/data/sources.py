"""Reading rows from local dataset files.

``iter_rows(source)`` yields ``(location, row)`` pairs, where ``location`` names the file and the 1-based line
(JSON lines, CSV) or record (JSON list, Parquet, ``datasets`` directories; ``path[key]`` for a JSON object of
rows) so that any later error about the row can point at it. Supported: ``.jsonl``/``.ndjson``, ``.json``,
``.csv``/``.tsv`` (each also gzip/bzip2/xz-compressed: ``.jsonl.gz``, ``.csv.xz``, ...), ``.parquet``, and
directories written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (pick one with
``split``). Rows are streamed where the format allows it (JSON lines, CSV, Parquet batches, Arrow datasets).

Files as people have them: text files are read as bytes and decoded line by line, so that
* a UTF-8 byte-order mark (Windows editors, Excel's "CSV UTF-8") is dropped, CRLF and lone-CR line endings are
  line endings, and blank lines (a trailing one, or one in the middle) are skipped;
* UTF-16/UTF-32 with a byte-order mark (PowerShell's ``>``, Excel's "Unicode text") is decoded;
* bytes that are not UTF-8 (a cp1252/Latin-1 export), a NUL byte (UTF-16 without a byte-order mark, or a binary
  file), a truncated last line or a corrupt compressed stream are one-line :class:`DataError` naming the file and
  the line, never a traceback. Parquet string columns holding invalid UTF-8 name the record and the column.

A ``.json`` file holds a list of rows, a wrapper object whose list sits under ``json_field`` (or under the only
key, then ``json_field`` is suggested), a single object that is one row, JSON lines (saved with a ``.json``
name), or an object of rows: pandas' ``to_json(orient="index")`` (``{id: row}``) and its default
``orient="columns"`` (``{column: {id: value}}``), told apart by which level carries the column names. A ``.jsonl``
file that holds one pretty-printed JSON array is read as JSON.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import os
import zlib
from collections.abc import Iterator

from sftjax.config import COLUMN_KEYS, SourceConfig
from sftjax.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
UNSUPPORTED_COMPRESSIONS = (".zst", ".zstd", ".zip", ".7z", ".lz4", ".tar", ".tgz")
# what a corrupt or truncated compressed stream raises while it is read
_STREAM_ERRORS = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, OSError)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_NOT_UTF8_HINT = "save it as UTF-8 (e.g. iconv -f cp1252 -t utf-8 IN > OUT)"


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
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: file is empty (0 bytes)")
        lower = path.lower()
        if lower.endswith(UNSUPPORTED_COMPRESSIONS):
            raise DataError(f"{path}: {os.path.splitext(lower)[1]} archives are not read; decompress the file, or "
                            f"compress it with gzip, bzip2 or xz (.jsonl.gz, .csv.bz2, ...)")
        compression = next((ext for ext in COMPRESSIONS if lower.endswith(ext)), None)
        inner = lower[:-len(compression)] if compression else lower
        columns = set(COLUMN_KEYS) | set(source.columns.values())
        if inner.endswith(JSONL_SUFFIXES):
            rows = _iter_jsonl(path, compression, source.json_field, columns)
        elif inner.endswith(".json"):
            rows = _iter_json(path, compression, source.json_field, columns)
        elif inner.endswith(CSV_SUFFIXES):
            rows = _iter_csv(path, compression, delimiter="\t" if inner.endswith(".tsv") else ",")
        elif inner.endswith(".parquet") and compression is None:
            rows = _iter_parquet(path)
        else:
            raise DataError(f"{path}: unsupported file type; use .jsonl, .json, .parquet, .csv (optionally .gz, "
                            f".bz2 or .xz compressed) or a datasets.save_to_disk directory")
    count = 0
    for location, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{location}: row is a {type(row).__name__}, expected a JSON object with named columns")
        count += 1
        yield location, row
    if count == 0:
        raise DataError(f"{path}: dataset is empty (no rows)")


# ---------------------------------------------------------------------------------------------------------------
# Text: bytes -> decoded lines


def _open_binary(path: str, compression: str | None):
    return COMPRESSIONS[compression](path, "rb") if compression else open(path, "rb")


def _encoding_of(head: bytes) -> str:
    for bom, encoding in _BOMS:  # UTF-32 LE before UTF-16 LE: its BOM starts with UTF-16 LE's
        if head.startswith(bom):
            return encoding
    return "utf-8"


def _not_utf8(path: str, line_number: int, line: bytes, err: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}:{line_number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1} "
                     f"of the line); {_NOT_UTF8_HINT}")


def _text_lines(path: str, compression: str | None) -> Iterator[tuple[int, str]]:
    """``(line number, text with its line ending)`` for every physical line (LF, CRLF or CR ended)."""
    line_number = 0
    try:
        with _open_binary(path, compression) as f:
            head = f.peek(4)[:4] if hasattr(f, "peek") else b""
            encoding = _encoding_of(head)
            if encoding in ("utf-16", "utf-32"):
                text = io.TextIOWrapper(f, encoding=encoding, newline="")
                try:
                    for line in text:
                        line_number += 1
                        yield line_number, line
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{line_number + 1}: not valid {encoding.upper()} ({err.reason}); "
                                    f"save the file as UTF-8") from None
                return
            for chunk in f:
                for raw in chunk.splitlines(keepends=True):  # LF, CRLF and CR; never inside a UTF-8 character
                    line_number += 1
                    if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                        raw = raw[len(codecs.BOM_UTF8):]
                    if b"\x00" in raw:
                        raise DataError(f"{path}:{line_number}: holds NUL bytes: a UTF-16/UTF-32 file without a "
                                        f"byte-order mark, or not a text file; save it as UTF-8")
                    try:
                        yield line_number, raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise _not_utf8(path, line_number, raw, err) from None
    except DataError:
        raise
    except PermissionError as err:
        raise DataError(f"{path}: cannot open the file ({err.strerror})") from None
    except _STREAM_ERRORS as err:
        where = f"{path}:{line_number + 1}" if line_number else path
        raise DataError(f"{where}: cannot read the {compression or 'file'} stream ({_one_line(err)}); the file is "
                        f"corrupt or truncated") from None


def _read_text(path: str, compression: str | None) -> str:
    """The whole file decoded (BOM dropped); invalid bytes name their line."""
    try:
        with _open_binary(path, compression) as f:
            data = f.read()
    except PermissionError as err:
        raise DataError(f"{path}: cannot open the file ({err.strerror})") from None
    except _STREAM_ERRORS as err:
        raise DataError(f"{path}: cannot read the {compression or 'file'} stream ({_one_line(err)}); the file is "
                        f"corrupt or truncated") from None
    encoding = _encoding_of(data[:4])
    if encoding in ("utf-16", "utf-32"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid {encoding.upper()} ({err.reason}); save the file as UTF-8") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    nul = data.find(b"\x00")
    if nul >= 0:
        line_number = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}:{line_number}: holds NUL bytes: a UTF-16/UTF-32 file without a "
                        f"byte-order mark, or not a text file; save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line_end = data.find(b"\n", err.start)
        line = data[line_start:line_end if line_end >= 0 else len(data)]
        shifted = UnicodeDecodeError("utf-8", line, err.start - line_start, err.end - line_start, err.reason)
        raise _not_utf8(path, data.count(b"\n", 0, err.start) + 1, line, shifted) from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------------------
# JSON lines and JSON


def _iter_jsonl(path: str, compression: str | None, json_field: str | None, columns: set[str],
                may_be_json: bool = True) -> Iterator[tuple[str, object]]:
    seen_row = False
    for line_number, line in _text_lines(path, compression):
        text = line.strip().lstrip("\ufeff")  # a byte-order mark mid-file: files concatenated with cat
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            if may_be_json and not seen_row and text.startswith("["):  # one pretty-printed array in a .jsonl
                yield from _iter_json(path, compression, json_field, columns, may_be_lines=False)
                return
            hint = "" if line.endswith(("\n", "\r")) else "; the file ends inside this line: is it truncated?"
            raise DataError(f"{path}:{line_number}: malformed JSON line ({err.msg} at column {err.colno}){hint}") \
                from None
        seen_row = True
        yield f"{path}:{line_number}", row


def _iter_json(path: str, compression: str | None, json_field: str | None, columns: set[str],
               may_be_lines: bool = True) -> Iterator[tuple[str, object]]:
    text = _read_text(path, compression)
    if not text.strip():
        raise DataError(f"{path}: file holds only whitespace, no JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and json_field is None and may_be_lines:  # JSON lines with a .json name
            yield from _iter_jsonl(path, compression, json_field, columns, may_be_json=False)
            return
        hint = "; the file ends before the JSON does: is it truncated?" if err.pos >= len(text.rstrip()) else ""
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}){hint}") from None
    if json_field is not None:
        if not isinstance(data, dict) or json_field not in data:
            keys = ", ".join(map(str, data)) if isinstance(data, dict) else f"a {type(data).__name__}"
            raise DataError(f"{path}: json_field {json_field!r} not found at the top level (found: {keys})")
        data = data[json_field]
        if not isinstance(data, list):
            raise DataError(f"{path}: json_field {json_field!r} holds a {type(data).__name__}, expected a list of rows")
    elif isinstance(data, dict):
        yield from _rows_of_object(path, data, columns)
        return
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is a {type(data).__name__}, expected a list of rows or an object")
    for index, row in enumerate(data, start=1):
        yield f"{path}:{index}", row


def _rows_of_object(path: str, data: dict, columns: set[str]) -> Iterator[tuple[str, object]]:
    """A top-level JSON object: a wrapper, one row, or rows keyed by id in either pandas orientation."""
    wrapped = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if len(data) == 1 and wrapped and wrapped[0] not in columns:
        raise DataError(f"{path}: top-level object wraps a list under {wrapped[0]!r}; set json_field: {wrapped[0]}")
    if data and all(isinstance(v, dict) and v for v in data.values()):
        inner_keys = [tuple(v) for v in data.values()]
        if set(data) & columns and len(set(inner_keys)) == 1:
            # {column: {id: value}}: pandas DataFrame.to_json()'s default orient="columns"
            for key in inner_keys[0]:
                yield f"{path}[{key}]", {column: values[key] for column, values in data.items()}
            return
        if not set(data) & columns and all(set(keys) & columns for keys in inner_keys):
            # {id: row}: orient="index", or any mapping of ids to rows
            for key, row in data.items():
                yield f"{path}[{key}]", row
            return
    yield f"{path}:1", data  # a single object is one row


# ---------------------------------------------------------------------------------------------------------------
# CSV


def _iter_csv(path: str, compression: str | None, delimiter: str) -> Iterator[tuple[str, object]]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long conversations in one cell are normal
    reader = csv.reader((line for _, line in _text_lines(path, compression)), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            return
        if delimiter == "," and len(header) == 1 and ";" in header[0]:
            # Excel writes ';'-separated "CSV" where ',' is the decimal separator
            yield from _iter_csv(path, compression, ";")
            return
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataError(f"{path}:1: the header repeats column {repeated[0]!r}; column names must be unique")
        for values in reader:
            if not values:
                continue  # a blank line
            where = f"{path}:{reader.line_num}"
            if len(values) != len(header):
                more = "more" if len(values) > len(header) else "fewer"
                raise DataError(f"{where}: row has {more} fields ({len(values)}) than the header ({len(header)})")
            yield where, dict(zip(header, values))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({_one_line(err)})") from None


# ---------------------------------------------------------------------------------------------------------------
# Parquet and datasets directories


def _iter_parquet(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({_one_line(err)})") from None
    index = 0
    batches = parquet.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # a corrupt page or row group, found only when it is read
            raise DataError(f"{path}:{index + 1}: cannot read Parquet data after record {index} "
                            f"({_one_line(err)})") from None
        if batch is None:
            return
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            raise _bad_parquet_string(path, batch, index) from None
        for row in rows:
            index += 1
            yield f"{path}:{index}", row


def _bad_parquet_string(path: str, batch, offset: int) -> DataError:
    """Find the record and column whose strings are not UTF-8 (only on the error path)."""
    for row in range(batch.num_rows):
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                column.slice(row, 1).to_pylist()
            except UnicodeDecodeError as err:
                return DataError(f"{path}:{offset + row + 1}: column {name!r} holds a string that is not valid "
                                 f"UTF-8 (byte 0x{err.object[err.start]:02x} at byte {err.start + 1}); write it as "
                                 f"UTF-8 text or as a binary column")
    return DataError(f"{path}:{offset + 1}: a string column is not valid UTF-8")


def _iter_saved_dataset(path: str, split: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as err:
        raise DataError(f"{path}: not a datasets.save_to_disk directory ({_one_line(err)})") from None
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
