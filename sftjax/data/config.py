"""Data configuration: which files to read, how to read them, and how to turn them into training tokens.

Frozen dataclasses with defaults; every value is checked in ``__post_init__`` so a bad config fails before any
file is opened, with a :class:`~sftjax.errors.ConfigError` naming the key, the value and what is allowed.
``DataConfig.from_dict`` builds the whole tree from a YAML mapping and rejects unknown keys, suggesting the
closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from sftjax.errors import ConfigError

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
MASKINGS = ("auto", "assistant", "completion", "last_assistant", "all")
PACKINGS = ("best", "bfd", "first_fit", "none")
OVERFLOWS = ("truncate", "split", "drop")
ON_BAD_ROW = ("error", "skip")
# Canonical column names a source may rename (value = the column in the file).
COLUMN_KEYS = (
    "messages", "conversations", "tools", "system", "instruction", "input", "output", "history",
    "prompt", "completion", "text",
)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _unknown_keys(section: str, given: dict, cls: type) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {section}{key!r}{hint}")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One dataset file or directory and how to read its rows."""

    path: str
    weight: float = 1.0
    format: str = "auto"
    columns: dict = dataclasses.field(default_factory=dict)
    json_field: str | None = None
    split: str | None = None
    system_prompt: str | None = None

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"source path={self.path!r} must be a non-empty string")
        where = f"source {self.path!r}: "
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ConfigError(f"{where}weight={self.weight!r} must be a positive number")
        _choice(f"{where}format", self.format, FORMATS)
        if not isinstance(self.columns, dict):
            raise ConfigError(f"{where}columns={self.columns!r} must be a mapping of canonical name -> column")
        for key, value in self.columns.items():
            if key not in COLUMN_KEYS:
                close = difflib.get_close_matches(str(key), COLUMN_KEYS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(COLUMN_KEYS)}"
                raise ConfigError(f"{where}columns has unknown key {key!r}; {hint}")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}columns.{key}={value!r} must be a column name (string)")
        for key in ("json_field", "split", "system_prompt"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{where}{key}={value!r} must be a string or null")

    @classmethod
    def from_dict(cls, d: Any, section: str = "data.sources[]") -> "SourceConfig":
        if isinstance(d, str):
            return cls(path=d)
        if not isinstance(d, dict):
            raise ConfigError(f"{section}={d!r} must be a path or a mapping with a 'path' key")
        _unknown_keys(f"{section}.", d, cls)
        if "path" not in d:
            raise ConfigError(f"{section} is missing the required key 'path'")
        return cls(**{**d, "columns": dict(d.get("columns") or {})})


def _sources(value: Any, key: str) -> tuple[SourceConfig, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, dict, SourceConfig)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}={value!r} must be a list of sources")
    return tuple(
        item if isinstance(item, SourceConfig) else SourceConfig.from_dict(item, f"{key}[{i}]")
        for i, item in enumerate(value)
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training (and eval) data: sources, masking, packing and loader settings."""

    sources: tuple[SourceConfig, ...]
    eval_sources: tuple[SourceConfig, ...] = ()
    eval_fraction: float = 0.0
    seed: int = 0
    max_length: int = 2048
    masking: str = "auto"
    chat_template: str | None = None
    packing: str = "best"
    overflow: str = "truncate"
    on_bad_row: str = "error"
    num_workers: int = 0
    cache_dir: str | None = None
    shuffle: bool = True
    prefetch: int = 2

    def __post_init__(self):
        object.__setattr__(self, "sources", _sources(self.sources, "data.sources"))
        object.__setattr__(self, "eval_sources", _sources(self.eval_sources, "data.eval_sources"))
        if not self.sources:
            raise ConfigError("data.sources is empty; give at least one dataset path")
        frac = self.eval_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
            raise ConfigError(f"data.eval_fraction={frac!r} must be a number in [0, 1)")
        for key, minimum in (("seed", None), ("max_length", 1), ("num_workers", 0), ("prefetch", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
                need = "an integer" if minimum is None else f"an integer >= {minimum}"
                raise ConfigError(f"data.{key}={value!r} must be {need}")
        _choice("data.masking", self.masking, MASKINGS)
        _choice("data.packing", self.packing, PACKINGS)
        _choice("data.overflow", self.overflow, OVERFLOWS)
        _choice("data.on_bad_row", self.on_bad_row, ON_BAD_ROW)
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template):
            raise ConfigError(f"data.chat_template={self.chat_template!r} must be a file path or inline Jinja")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ConfigError(f"data.cache_dir={self.cache_dir!r} must be a directory path or null")
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"data.shuffle={self.shuffle!r} must be true or false")

    @classmethod
    def from_dict(cls, d: Any) -> "DataConfig":
        """Build from a YAML mapping (the ``data:`` section); unknown keys fail with a suggestion."""
        if not isinstance(d, dict):
            raise ConfigError(f"data={d!r} must be a mapping")
        _unknown_keys("data.", d, cls)
        if "sources" not in d:
            raise ConfigError("data is missing the required key 'sources'")
        return cls(**d)
