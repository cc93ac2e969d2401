"""The generic config builder: a frozen dataclass section from a YAML mapping.

Every section of ``sftjax.config`` derives from :class:`Section`. Building one converts each value to its field's
declared type (``Literal`` choices list what is allowed; nested sections and lists of them are built recursively),
refuses unknown keys with the closest known key suggested, refuses missing required keys, and then runs the
section's ``check()`` for the rules between fields. Each problem is one :class:`~sftjax.errors.ConfigError` line
naming the key. Also here: reading a YAML file and applying ``a.b=value`` command-line overrides. No jax.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import types
import typing
from typing import Any, ClassVar, Literal

import yaml

from sftjax.errors import ConfigError


class Section:
    """Base of every config section: conversion + ``check()`` at construction, ``from_dict`` for YAML."""

    SECTION: ClassVar[str] = "config"
    SHORTHAND: ClassVar[str | None] = None  # a plain string given for the section fills this field

    def __post_init__(self):
        hints = _hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            converted = _convert(f"{self.SECTION}.{field.name}", value, hints[field.name])
            if converted is not value:
                object.__setattr__(self, field.name, converted)
        self.check()

    def check(self) -> None:
        """Rules between fields (one-line ConfigErrors)."""

    @classmethod
    def from_dict(cls, raw: Any, section: str | None = None):
        """The section from a YAML mapping (unknown keys suggest the closest known one)."""
        return _build(cls, raw, section or cls.SECTION)


def _positive(key: str, value, *, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------- conversion

_HINTS: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is dict or origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping" + (f" or a {tp.SHORTHAND}" if getattr(tp, "SHORTHAND", None) else "")
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked and converted to type ``tp``; a ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(key, value, options[0])
        for arg in options:
            try:
                return _convert(key, value, arg)
            except ConfigError:
                continue
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        items = [_convert(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
        if origin is tuple:
            return value if isinstance(value, tuple) and all(a is b for a, b in zip(items, value)) else tuple(items)
        return value if isinstance(value, list) and all(a is b for a, b in zip(items, value)) else items
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return value if isinstance(value, float) else float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and getattr(tp, "SHORTHAND", None):
            value = {tp.SHORTHAND: value}
        return _build(tp, value, key)
    raise bad  # pragma: no cover


def _build(cls: type, given: Any, section: str) -> Any:
    """A section dataclass from a mapping: unknown and missing keys refused, each value converted."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{section}={given!r} must be a mapping")
    hints = _hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    kwargs = {}
    for key, value in given.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {section}.{close[0]}?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {section}.{key}; {hint}")
        kwargs[key] = _convert(f"{section}.{key}", value, hints[key])
    for field in fields:
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.name not in kwargs:
            raise ConfigError(f"{section} is missing the required key {field.name!r}")
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set ``a.b.c=value`` entries (value parsed as YAML) in a nested mapping, creating sections as needed."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({str(err).splitlines()[0]})") from None
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file's top-level mapping (one-line errors for a missing or malformed file)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw
