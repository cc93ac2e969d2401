"""DataConfig / SourceConfig validation: defaults, from_dict, and one-line errors naming the key."""

import pytest

from sftjax.config import DataConfig, SourceConfig
from sftjax.errors import ConfigError


def test_defaults_and_from_dict():
    cfg = DataConfig.from_dict({"sources": ["a.jsonl", {"path": "b.json", "weight": 2, "json_field": "data",
                                                        "columns": {"prompt": "question", "completion": "answer"}}]})
    assert cfg.sources[0] == SourceConfig(path="a.jsonl")
    assert cfg.sources[1].weight == 2 and cfg.sources[1].columns == {"prompt": "question", "completion": "answer"}
    assert (cfg.masking, cfg.packing, cfg.overflow, cfg.on_bad_row, cfg.max_length) == (
        "auto", "best", "truncate", "error", 2048)
    assert cfg.eval_sources == () and cfg.shuffle is True


@pytest.mark.parametrize("data, needle", [
    ({"sources": ["a"], "maskng": "all"}, "unknown key data.maskng; did you mean data.masking?"),
    ({"sources": ["a"], "masking": "everything"}, "data.masking='everything'"),
    ({"sources": ["a"], "packing": "greedy"}, "data.packing"),
    ({"sources": ["a"], "overflow": "wrap"}, "data.overflow"),
    ({"sources": ["a"], "on_bad_row": "ignore"}, "data.on_bad_row"),
    ({"sources": ["a"], "max_length": 0}, "data.max_length=0"),
    ({"sources": ["a"], "eval_fraction": 1.5}, "data.eval_fraction=1.5"),
    ({"sources": []}, "data.sources is empty"),
    ({}, "'sources'"),
    ({"sources": [{"path": "a", "formt": "alpaca"}]}, "unknown key data.sources[0].formt; did you mean data.sources[0].format?"),
    ({"sources": [{"path": "a", "format": "yaml"}]}, "data.sources[0].format='yaml' is not allowed"),
    ({"sources": [{"path": "a", "weight": -1}]}, "weight=-1"),
    ({"sources": [{"path": "a", "columns": {"promt": "q"}}]}, "did you mean 'prompt'"),
    ({"sources": [{"weight": 1}]}, "'path'"),
])
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ConfigError) as err:
        DataConfig.from_dict(data)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_frozen():
    cfg = DataConfig(sources=(SourceConfig("a.jsonl"),))
    with pytest.raises(Exception):
        cfg.seed = 3
