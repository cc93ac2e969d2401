"""Run configuration: one YAML file -> typed, validated dataclasses.

A config is a mapping of sections (``model``, ``tokenizer``, ``data``, ``lora``, ``optim``, ``train``, and
free-form sections other parts of sftjax own, such as ``checkpoint``). ``load_config(path, overrides)`` reads
the YAML, applies ``a.b=value`` overrides (the value is parsed as YAML, so ``3``, ``1e-4``, ``true``, ``[a,b]``
work), converts each value to the field's declared type and validates everything before any jax code runs.
Every problem is one :class:`~sftjax.errors.ConfigError` line naming the key, the bad value and what is
allowed; an unknown key suggests the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any, Literal

import yaml

from sftjax.errors import ConfigError

REMAT_POLICIES = ("none", "full", "save_dots", "offload_dots")
DTYPES = ("float32", "bfloat16", "float16")
# Sections owned by other modules, kept as raw mappings and validated by their owners.
FREE_SECTIONS = ("checkpoint",)


@dataclasses.dataclass
class ModelSection:
    """Which model to fine-tune and how to run it."""

    path: str | None = None  # HF directory, GGUF file or alias understood by sftjax.load_model
    init: dict | None = None  # ModelConfig fields of a random-init model (tests, demos)
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # master weights
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # forward/backward
    remat: Literal["none", "full", "save_dots", "offload_dots"] = "none"  # per decoder layer (or scanned period)
    attention_implementation: str | None = None
    cross_entropy_implementation: str | None = None
    scan_layers: bool = False  # stack the layers and run them with lax.scan (faster compiles of deep models)

    def validate(self) -> None:
        if (self.path is None) == (self.init is None):
            raise ConfigError("model: give exactly one of model.path (checkpoint/alias) or model.init (random init)")


@dataclasses.dataclass
class TokenizerSection:
    path: str | None = None  # default: the model's own tokenizer


@dataclasses.dataclass
class LoraSection:
    """PEFT-style LoRA adapters; disabled = full fine-tuning."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r={self.r!r} must be an integer >= 1")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]


@dataclasses.dataclass
class OptimSection:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: Literal["adamw", "adafactor", "sgd"] = "adamw"
    learning_rate: float = 1e-4
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # final lr = learning_rate * min_lr_ratio (linear/cosine)
    weight_decay: float = 0.0
    # regexes over parameter paths that get no weight decay (norms, biases, embeddings by default)
    no_decay: list[str] = dataclasses.field(default_factory=lambda: ["norm", "bias", "embed"])
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0  # sgd
    max_grad_norm: float | None = 1.0
    z_loss: float = 0.0

    def validate(self) -> None:
        if not self.learning_rate > 0:
            raise ConfigError(f"optim.learning_rate={self.learning_rate!r} must be > 0")
        for key in ("warmup_steps",):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} must be >= 0")
        for key in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} must be in [0, 1]")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay!r} must be >= 0")
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} must be in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"optim.max_grad_norm={self.max_grad_norm!r} must be > 0 or null (no clipping)")
        if self.z_loss < 0:
            raise ConfigError(f"optim.z_loss={self.z_loss!r} must be >= 0")


@dataclasses.dataclass
class MeshSection:
    """Device mesh sizes; -1 = all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if sum(1 for v in sizes.values() if v == -1) > 1:
            raise ConfigError(f"train.mesh={sizes} may use -1 for at most one axis")
        for key, value in sizes.items():
            if value == 0 or value < -1:
                raise ConfigError(f"train.mesh.{key}={value!r} must be a positive integer or -1")

    def resolve(self, device_count: int) -> dict[str, int]:
        """Concrete axis sizes for ``device_count`` devices (one-line error when they do not fit)."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        fixed = 1
        for value in sizes.values():
            if value != -1:
                fixed *= value
        if device_count % fixed:
            raise ConfigError(f"train.mesh={sizes} needs a multiple of {fixed} devices; {device_count} available")
        for key, value in sizes.items():
            if value == -1:
                sizes[key] = device_count // fixed
        if sizes["data"] * sizes["fsdp"] * sizes["tensor"] != device_count:
            raise ConfigError(f"train.mesh={sizes} uses {sizes['data'] * sizes['fsdp'] * sizes['tensor']} devices; "
                              f"{device_count} available (use -1 for one axis)")
        return sizes


@dataclasses.dataclass
class TrainSection:
    """Loop length, batch geometry, cadence and outputs."""

    steps: int | None = None
    epochs: float | None = None
    global_batch_size: int = 8  # rows per optimizer step, over all devices and hosts
    micro_batch_size: int | None = None  # rows per accumulation micro-batch (global); default = global
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int | None = None  # cap on eval batches per evaluation (None = all)
    log_every: int = 10
    seed: int = 0
    output_dir: str = "runs/default"
    save: Literal["merged", "adapter", "none"] = "merged"
    progress: bool = True
    tensorboard: bool = True
    peak_flops: float | None = None  # per device; default from the device table
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    distributed: Literal["auto", "on", "off"] = "auto"  # join a multi-process job (sftjax.train.distributed)

    def validate(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("train: give train.steps or train.epochs")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.steps={self.steps!r} must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"train.epochs={self.epochs!r} must be > 0")
        if self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size!r} must be >= 1")
        if self.micro_batch_size is None:
            self.micro_batch_size = self.global_batch_size
        if self.micro_batch_size < 1 or self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.micro_batch_size={self.micro_batch_size!r} must divide "
                              f"train.global_batch_size={self.global_batch_size}")
        for key in ("eval_every", "log_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)!r} must be >= 0")
        if self.log_every == 0:
            self.log_every = 1
        self.mesh.validate()

    @property
    def accum_steps(self) -> int:
        return self.global_batch_size // self.micro_batch_size


@dataclasses.dataclass
class Config:
    """A whole run. ``data`` holds a :class:`sftjax.data.config.DataConfig` (or None for eval-less tools)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    data: Any = None
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    extra: dict = dataclasses.field(default_factory=dict)  # FREE_SECTIONS, raw
    source_path: str | None = None

    def check_devices(self, device_count: int) -> dict[str, int]:
        """Resolve the mesh and check the batch splits evenly over its batch axes; returns the mesh sizes."""
        sizes = self.train.mesh.resolve(device_count)
        shards = sizes["data"] * sizes["fsdp"]
        if self.train.micro_batch_size % shards:
            raise ConfigError(f"train.micro_batch_size={self.train.micro_batch_size} (global_batch_size="
                              f"{self.train.global_batch_size} / accumulation) is not divisible by the "
                              f"{shards} batch shards (mesh data*fsdp over {device_count} devices)")
        return sizes

    @property
    def checkpoint(self):
        """The ``checkpoint:`` section validated as a :class:`sftjax.train.checkpoint.CheckpointSection` (directory,
        save_every_steps, save_every_minutes=30, keep=3, keep_best=0, resume=auto|never|<path>, async_save=true).

        It stays raw in ``extra`` (the checkpoint module owns its fields) and is validated here, on first use,
        which the trainer does before building anything."""
        from sftjax.train.checkpoint import CheckpointSection

        raw = self.extra.get("checkpoint")
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"checkpoint={raw!r} must be a mapping of checkpoint settings")
        return CheckpointSection.from_dict(raw)

    def to_dict(self) -> dict:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("extra", "source_path")}
        out.update(self.extra)
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------- conversion

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is dict or origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Value checked/converted to type ``tp``; ConfigError naming ``key`` otherwise."""
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
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, value, arg)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_convert(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise bad  # pragma: no cover


def _build(cls: type, given: Any, section: str) -> Any:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{section}={given!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in given.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {section}.{close[0]}?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {section}.{key}; {hint}")
        kwargs[key] = _convert(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


SECTIONS = {"model": ModelSection, "tokenizer": TokenizerSection, "lora": LoraSection, "optim": OptimSection,
            "train": TrainSection}


def config_from_dict(raw: dict, *, source_path: str | None = None) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (the parsed YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source_path or 'config'}: the top level must be a mapping of sections")
    known = list(SECTIONS) + ["data"] + list(FREE_SECTIONS)
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known sections: {', '.join(known)}"
            raise ConfigError(f"unknown config section {key!r}; {hint}")
    sections = {name: _build(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    data = None
    if raw.get("data") is not None:
        from sftjax.data.config import DataConfig

        data = DataConfig.from_dict(raw["data"])
    extra = {name: raw[name] for name in FREE_SECTIONS if name in raw}
    cfg = Config(data=data, extra=extra, source_path=source_path, **sections)
    for name in SECTIONS:
        validate = getattr(getattr(cfg, name), "validate", None)
        if validate is not None:
            validate()
    cfg.checkpoint  # validates the checkpoint section now, so a typo fails with the rest of the config
    return cfg


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set ``a.b.c=value`` entries (value parsed as YAML) in a nested mapping, creating sections as needed."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, text = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".")]
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


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start empty when ``path`` is None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source_path=str(path) if path else None)
