"""Safetensors directory reading/writing: shard planning, index, stale files, dtypes, one-line errors."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from sftjax.errors import CheckpointError
from sftjax.models import hf_io


def _entries(arrays):
    return [(name, array.nbytes, (lambda a=array: a)) for name, array in arrays.items()]


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "a": rng.normal(size=(10, 10)).astype(np.float32),  # 400 bytes
        "b": rng.normal(size=(50,)).astype(np.float32),  # 200 bytes
        "big": rng.normal(size=(30, 10)).astype(np.float32),  # 1200 bytes: larger than the limit below
        "c": rng.normal(size=(4, 4)).astype(ml_dtypes.bfloat16),
    }


def test_single_file_when_under_the_limit(tmp_path):
    arrays = _arrays()
    written = hf_io.write_safetensors(_entries(arrays), tmp_path, max_shard_bytes=10**9)
    assert [p.name for p in written] == ["model.safetensors"]
    back = dict(hf_io.iter_safetensors(tmp_path))
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)


def test_shards_respect_the_limit_and_index_lists_every_tensor(tmp_path):
    arrays = _arrays()
    written = hf_io.write_safetensors(_entries(arrays), tmp_path, max_shard_bytes=700)
    shards = [p for p in written if p.suffix == ".safetensors"]
    assert [p.name for p in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / hf_io.INDEX_NAME).read_text())
    assert index["weight_map"] == {"a": shards[0].name, "b": shards[0].name, "big": shards[1].name,
                                   "c": shards[2].name}
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    assert hf_io.safetensors_files(tmp_path) == shards
    np.testing.assert_array_equal(dict(hf_io.iter_safetensors(tmp_path))["big"], arrays["big"])


def test_rewrite_removes_stale_shards(tmp_path):
    hf_io.write_safetensors(_entries(_arrays()), tmp_path, max_shard_bytes=700)
    hf_io.write_safetensors(_entries({"x": np.zeros(3, np.float32)}), tmp_path, max_shard_bytes=700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_read_config_json_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf_io.read_config_json(tmp_path / "missing")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a Hugging Face checkpoint directory or a .gguf file"):
        hf_io.read_config_json(tmp_path / "file.bin")
    with pytest.raises(CheckpointError, match="config.json not found"):
        hf_io.read_config_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        hf_io.read_config_json(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / hf_io.INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError) as error:
        hf_io.safetensors_files(tmp_path)
    assert "model-00001-of-00002.safetensors" in str(error.value) and "missing" in str(error.value)
    (tmp_path / hf_io.INDEX_NAME).write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        hf_io.safetensors_files(tmp_path)


def test_corrupt_file_is_one_line_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00")
    with pytest.raises(CheckpointError) as error:
        list(hf_io.iter_safetensors(tmp_path))
    assert "model.safetensors" in str(error.value) and "\n" not in str(error.value)
