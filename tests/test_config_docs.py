"""docs/configuration.md is generated from sftjax/config.py and must not drift from it."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

from sftjax import config as config_module
from sftjax.models.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_what_the_generator_writes():
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == _generator().render(), (
        "docs/configuration.md is out of date with sftjax/config.py: run python scripts/gen_config_docs.py")


def test_every_key_is_documented_with_its_default_and_comment():
    text = _generator().render()
    sections = text.split("\n## ")
    by_heading = {part.split("`")[1]: part for part in sections[1:]}
    for cls in [*config_module.SECTIONS.values(), config_module.SourceConfig, config_module.MeshSection]:
        section = by_heading[cls.SECTION]
        for field in dataclasses.fields(cls):
            row = next((line for line in section.splitlines() if line.startswith(f"| `{field.name}` |")), None)
            assert row is not None, f"{cls.SECTION}.{field.name} is missing"
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                assert "| required |" in row, row
    init = by_heading["model.init"]
    for field in dataclasses.fields(ModelConfig):
        documented = f"| `{field.name}` |" in init
        assert documented == (field.name not in ("dtype", "param_dtype", "remat", "hf_extra")), field.name
    # Values come from the dataclasses, descriptions from the comments in the source.
    assert "| `max_length` | integer | `2048` | tokens per packed row |" in by_heading["data"]
    assert "| `no_decay` | list of string | `[norm, bias, embed]` | regexes over parameter paths" in by_heading["optim"]
    assert "| `packing` | one of `best`, `bfd`, `first_fit`, `none` | `best` |" in by_heading["data"]
    assert "| `mesh` | section `train.mesh` | see `train.mesh` |" in by_heading["train"]


def test_comments_are_read_from_the_source():
    generator = _generator()
    source = '''
class Example:
    """Doc."""

    # a leading comment
    # on two lines
    alpha: int = 1  # beside alpha
    beta: str = "x"
    gamma: dict = dataclasses.field(  # starts here
        default_factory=dict)  # and ends here
'''
    assert generator._field_comments(source) == {"Example": {
        "alpha": "a leading comment on two lines beside alpha", "beta": "", "gamma": "starts here and ends here"}}
    assert generator._field_comments(source, leading=False)["Example"]["alpha"] == "beside alpha"
