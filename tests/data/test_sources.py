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
