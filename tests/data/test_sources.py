"""sources.iter_rows: every supported file type (real assets and small written files), locations, and errors."""

from __future__ import annotations

import json

import pytest

from sftjax.config import SourceConfig
from sftjax.data.sources import iter_rows
from sftjax.errors import DataError
from tests.conftest import require


def _rows(path, **kwargs):
    return list(iter_rows(SourceConfig(path=str(path), **kwargs)))


def test_real_jsonl_and_json(assets_dir):
    gsm = assets_dir / "datasets" / "gsm8k" / "test.jsonl"
    rows = _rows(gsm)
    assert len(rows) == 1319 and rows[0][0] == f"{gsm}:1" and set(rows[0][1]) == {"question", "answer"}
    with open(gsm) as f:
        assert rows[41][1] == json.loads(f.readlines()[41])
    alpaca_path = assets_dir / "datasets" / "instruction" / "alpaca_en_demo.json"
    alpaca = _rows(alpaca_path)
    assert len(alpaca) == 999 and alpaca[0][0] == f"{alpaca_path}:1" and alpaca[998][0] == f"{alpaca_path}:999"
    with open(alpaca_path) as f:
        assert [row for _, row in alpaca] == json.load(f)
    # a single top-level object is one row (the ShareGPT fixture)
    one = _rows(assets_dir / "datasets" / "chat" / "sharegpt_conversation.json")
    assert len(one) == 1 and "conversations" in one[0][1]
    assert len(_rows(assets_dir / "datasets" / "tool_calling" / "reason_tool_use_demo_50.jsonl")) == 50


def test_json_wrapper_parquet_csv_and_saved_dataset(tmp_path):
    data = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    (tmp_path / "w.json").write_text(json.dumps({"meta": 1, "data": data}))
    rows = _rows(tmp_path / "w.json", json_field="data")
    assert [r for _, r in rows] == data and rows[2][0].endswith("w.json:3")
    with pytest.raises(DataError, match="json_field"):
        _rows(tmp_path / "w.json", json_field="items")
    (tmp_path / "only.json").write_text(json.dumps({"data": data}))
    with pytest.raises(DataError, match="set json_field: data"):
        _rows(tmp_path / "only.json")

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "d.parquet")
    rows = _rows(tmp_path / "d.parquet")
    assert [r for _, r in rows] == data and rows[4][0].endswith("d.parquet:5")

    (tmp_path / "d.csv").write_text("prompt,completion\np0,c0\n\"multi\nline\",c1\np2,c2\n")
    rows = _rows(tmp_path / "d.csv")
    assert [r for _, r in rows] == [{"prompt": "p0", "completion": "c0"}, {"prompt": "multi\nline", "completion": "c1"},
                                    {"prompt": "p2", "completion": "c2"}]
    assert rows[2][0].endswith("d.csv:5")  # physical line of the row's end

    datasets = require("datasets")
    datasets.Dataset.from_list(data).save_to_disk(str(tmp_path / "ds"))
    assert [r for _, r in _rows(tmp_path / "ds")] == data
    datasets.DatasetDict({"train": datasets.Dataset.from_list(data),
                          "test": datasets.Dataset.from_list(data[:2])}).save_to_disk(str(tmp_path / "dd"))
    rows = _rows(tmp_path / "dd", split="test")
    assert [r for _, r in rows] == data[:2] and rows[0][0] == f"{tmp_path / 'dd'}[test]:1"
    with pytest.raises(DataError, match="set split"):
        _rows(tmp_path / "dd")
    with pytest.raises(DataError, match="split 'dev' not found"):
        _rows(tmp_path / "dd", split="dev")


def test_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(DataError) as err:
        _rows(bad)
    assert str(err.value).startswith(f"{bad}:3: malformed JSON") and "\n" not in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        _rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        _rows(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty"):
        _rows(tmp_path / "empty.json")
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DataError, match="list.jsonl:1: row is a list"):
        _rows(tmp_path / "list.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        _rows(tmp_path / "x.txt")
    (tmp_path / "broken.json").write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(DataError, match="broken.json:2: malformed JSON"):
        _rows(tmp_path / "broken.json")


def test_streams_lazily(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(1000)) + "{broken\n")
    iterator = iter_rows(SourceConfig(path=str(path)))
    assert [next(iterator)[1]["text"] for _ in range(3)] == ["0", "1", "2"]  # no error until the bad line


# ---------------------------------------------------------------------------------------------------------------
# Files as people have them: the bytes below are what Windows editors, Excel, PowerShell, pandas, cat and an
# interrupted download write.

BOM = b"\xef\xbb\xbf"
ROWS = [{"prompt": "Qu'est-ce que c'est ?", "completion": "Un caf\u00e9."}, {"prompt": "2+2", "completion": "4"}]


def _one_line_error(path, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        _rows(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def _jsonl_bytes(rows, newline=b"\n") -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + newline for r in rows)


def test_jsonl_with_bom_crlf_and_blank_lines_loads(tmp_path):
    path = tmp_path / "notepad.jsonl"
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in ROWS]
    path.write_bytes(BOM + lines[0] + b"\r\n\r\n   \r\n" + lines[1] + b"\r\n\r\n")
    rows = _rows(path)
    assert [r for _, r in rows] == ROWS
    assert [loc for loc, _ in rows] == [f"{path}:1", f"{path}:4"]  # physical line numbers, blank lines counted
    # old Mac line endings, and a byte-order mark in the middle (two such files joined with cat)
    path.write_bytes(lines[0] + b"\r" + BOM + lines[1] + b"\r")
    assert [r for _, r in _rows(path)] == ROWS


def test_json_with_bom_and_crlf_loads(tmp_path):
    path = tmp_path / "excel.json"
    path.write_bytes(BOM + json.dumps(ROWS, ensure_ascii=False, indent=2).replace("\n", "\r\n").encode())
    assert [r for _, r in _rows(path)] == ROWS


def test_invalid_utf8_is_one_line_naming_file_and_line(tmp_path):
    cp1252 = "Un caf\u00e9.".encode("cp1252")  # 0xe9: not UTF-8
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "x", "completion": "' + cp1252 + b'"}\n')
    message = _one_line_error(jsonl)
    assert message.startswith(f"{jsonl}:3: not valid UTF-8 (byte 0xe9") and "iconv" in message, message
    json_file = tmp_path / "latin1.json"
    json_file.write_bytes(b'[\n {"prompt": "a", "completion": "b"},\n {"prompt": "x", "completion": "' + cp1252
                          + b'"}\n]\n')
    assert _one_line_error(json_file).startswith(f"{json_file}:3: not valid UTF-8 (byte 0xe9")
    csv_file = tmp_path / "latin1.csv"
    csv_file.write_bytes(b"prompt,completion\r\na,b\r\n\"x\r\ny\"," + cp1252 + b"\r\n")
    assert _one_line_error(csv_file).startswith(f"{csv_file}:4: not valid UTF-8 (byte 0xe9")


def test_parquet_string_column_with_invalid_utf8_names_record_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    completions = pa.array([b"ok", b"caf\xe9", b"fine"], type=pa.binary()).view(pa.string())
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": completions}), path)
    message = _one_line_error(path)
    assert message.startswith(f"{path}:2: column 'completion' holds a string that is not valid UTF-8"), message


def test_csv_from_excel_bom_crlf_semicolons_and_long_cells(tmp_path):
    path = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": BOM, CRLF, a quoted cell spanning lines
    path.write_bytes(BOM + b"prompt,completion\r\n\"two\r\nlines\",\"Un caf\xc3\xa9.\"\r\n\r\np2,c2\r\n")
    rows = _rows(path)
    assert [r for _, r in rows] == [{"prompt": "two\r\nlines", "completion": "Un caf\u00e9."},
                                    {"prompt": "p2", "completion": "c2"}]
    assert [loc for loc, _ in rows] == [f"{path}:3", f"{path}:5"]
    path.write_bytes(BOM + b"prompt;completion\r\n2+2;4\r\n")  # Excel where ',' is the decimal separator
    assert [r for _, r in _rows(path)] == [{"prompt": "2+2", "completion": "4"}]
    long = "word " * 40_000  # 200 kB in one cell, over the csv module's default field limit
    path.write_text(f'prompt,completion\n"{long}",ok\n', encoding="utf-8")
    assert _rows(path)[0][1]["prompt"] == long


def test_csv_rows_must_fit_the_header(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_bytes(b"prompt,completion\na,b\nc\n")
    assert _one_line_error(path).startswith(f"{path}:3: row has fewer fields (1) than the header (2)")
    path.write_bytes(b"prompt,completion\na,b,c\n")
    assert _one_line_error(path).startswith(f"{path}:2: row has more fields (3) than the header (2)")
    path.write_bytes(b"prompt,prompt\na,b\n")
    assert "repeats column 'prompt'" in _one_line_error(path)


def test_utf16_with_and_without_byte_order_mark(tmp_path):
    path = tmp_path / "powershell.jsonl"  # PowerShell 5's `>` writes UTF-16LE with a byte-order mark
    path.write_bytes(_jsonl_bytes(ROWS, b"\r\n").decode().encode("utf-16"))
    assert [r for _, r in _rows(path)] == ROWS
    csv_file = tmp_path / "unicode.tsv"  # Excel's "Unicode Text"
    csv_file.write_bytes("prompt\tcompletion\r\n2+2\t4\r\n".encode("utf-16"))
    assert [r for _, r in _rows(csv_file)] == [{"prompt": "2+2", "completion": "4"}]
    path.write_bytes(_jsonl_bytes(ROWS).decode().encode("utf-16-le"))  # no byte-order mark
    assert "NUL bytes" in _one_line_error(path)


def test_empty_and_truncated_files(tmp_path):
    for name in ("empty.jsonl", "empty.json", "empty.csv", "empty.parquet"):
        (tmp_path / name).write_bytes(b"")
        assert _one_line_error(tmp_path / name).endswith("file is empty (0 bytes)")
    (tmp_path / "blank.json").write_bytes(b"\r\n  \r\n")
    assert "only whitespace" in _one_line_error(tmp_path / "blank.json")
    cut = tmp_path / "cut.jsonl"  # an interrupted download or a full disk: the last line stops mid-record
    cut.write_bytes(_jsonl_bytes(ROWS) + b'{"prompt": "x", "compl')
    message = _one_line_error(cut)
    assert message.startswith(f"{cut}:3: malformed JSON line") and "truncated" in message
    cut_json = tmp_path / "cut.json"
    cut_json.write_bytes(json.dumps(ROWS).encode()[:-20])
    assert "truncated" in _one_line_error(cut_json)


def test_json_object_of_rows_in_both_pandas_orientations(tmp_path):
    by_id = tmp_path / "index.json"  # DataFrame.to_json(orient="index"), or any {id: row} dump
    by_id.write_text(json.dumps({"a1": ROWS[0], "b2": ROWS[1]}))
    rows = _rows(by_id)
    assert [r for _, r in rows] == ROWS and [loc for loc, _ in rows] == [f"{by_id}[a1]", f"{by_id}[b2]"]
    by_column = tmp_path / "columns.json"  # DataFrame.to_json(): orient="columns", pandas' default
    by_column.write_text(json.dumps({"prompt": {"0": ROWS[0]["prompt"], "1": ROWS[1]["prompt"]},
                                     "completion": {"0": ROWS[0]["completion"], "1": ROWS[1]["completion"]}}))
    rows = _rows(by_column)
    assert [r for _, r in rows] == ROWS and rows[1][0] == f"{by_column}[1]"
    one = tmp_path / "one.json"  # still: a single object is one row
    one.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "meta": {"id": 3}}))
    assert [r for _, r in _rows(one)] == [json.loads(one.read_text())]


def test_pretty_printed_array_in_a_jsonl_file(tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps(ROWS, indent=2))
    assert [r for _, r in _rows(path)] == ROWS


def test_compressed_files(tmp_path):
    import bz2
    import gzip
    import lzma

    for suffix, compress in ((".jsonl.gz", gzip.compress), (".jsonl.bz2", bz2.compress), (".jsonl.xz", lzma.compress)):
        path = tmp_path / f"rows{suffix}"
        path.write_bytes(compress(BOM + _jsonl_bytes(ROWS, b"\r\n")))
        rows = _rows(path)
        assert [r for _, r in rows] == ROWS and rows[1][0] == f"{path}:2"
    (tmp_path / "rows.json.gz").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert [r for _, r in _rows(tmp_path / "rows.json.gz")] == ROWS
    (tmp_path / "rows.csv.gz").write_bytes(gzip.compress(b"prompt,completion\n2+2,4\n"))
    assert [r for _, r in _rows(tmp_path / "rows.csv.gz")] == [{"prompt": "2+2", "completion": "4"}]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(_jsonl_bytes(ROWS * 200))[:-40])
    assert "corrupt or truncated" in _one_line_error(cut)
    (tmp_path / "rows.jsonl.zst").write_bytes(b"(\xb5/\xfd")
    assert "decompress" in _one_line_error(tmp_path / "rows.jsonl.zst")
