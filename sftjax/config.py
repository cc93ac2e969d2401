"""Run configuration: one YAML file -> frozen, validated dataclasses. Every section lives in this file; the
generic builder they share is :mod:`sftjax.schema`.

A config is a mapping of sections (``model``, ``tokenizer``, ``data``, ``lora``, ``optim``, ``train``,
``checkpoint``). ``load_config(path, overrides)`` reads the YAML, applies ``a.b=value`` overrides (the value is
parsed as YAML, so ``3``, ``1e-4``, ``true``, ``[a,b]`` work) and builds each section with one generic builder:
unknown keys are refused with the closest known key suggested, each value is converted to its field's declared
type (``Literal`` choices list what is allowed), and each section's ``check()`` enforces the rules between
fields. Every problem is one :class:`~sftjax.errors.ConfigError` line naming the key, the bad value and what is
allowed, raised before any jax code runs (this module imports no jax). Sections built directly in Python go
through the same conversion and checks in ``__post_init__``. Nothing is mutated after construction: derived
values (the micro-batch size, the logging interval) are properties.

Relative paths (data sources, a chat template file, tokenizer and model directories) are used as given when they
exist from the working directory, else relative to the config file's folder when they exist there.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import re
from typing import ClassVar, Literal

from pallas_kernels import choices as kernel_choices
from sftjax.errors import ConfigError
from sftjax.models.config import REMAT_POLICIES
from sftjax.models.moe_config import IMPLEMENTATIONS as MOE_IMPLEMENTATIONS
from sftjax.schema import Section, _build, _plain, _positive, apply_overrides, read_yaml

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLEMENTATIONS = (kernel_choices.AUTO, *kernel_choices.ATTENTION)
CROSS_ENTROPY_IMPLEMENTATIONS = (kernel_choices.AUTO, *kernel_choices.CROSS_ENTROPY)
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
MASKINGS = ("auto", "assistant", "completion", "last_assistant", "all")
REASONING = ("all", "last", "none")
PACKINGS = ("best", "bfd", "first_fit", "none")
OVERFLOWS = ("truncate", "split", "drop")
ON_BAD_ROW = ("error", "skip")
QUANTIZE = ("none", "nf4", "int8")  # sftjax.models.quant
LORA_INITS = ("default", "gaussian", "pissa", "olora")  # sftjax.peft.init
ANSWERS = ("exact", "number", "gsm8k", "regex:PATTERN")  # how generation eval compares answers (sftjax.infer.evaluate)
MOE_OVERRIDES = ("router_aux_loss_coef", "router_z_loss_coef", "implementation")  # model.moe keys
# Canonical column names a source may rename (value = the column in the file).
COLUMN_KEYS = ("messages", "conversations", "tools", "system", "instruction", "input", "output", "history",
               "prompt", "completion", "text")


def check_answer_spec(spec: str, key: str = "--answer") -> None:
    """A one-line ConfigError unless ``spec`` is exact, number, gsm8k or regex:<a valid pattern>."""
    if spec in ANSWERS[:3]:
        return
    if not spec.startswith("regex:"):
        raise ConfigError(f"{key}={spec!r} is not one of {', '.join(ANSWERS)}")
    pattern = spec[len("regex:"):]
    if not pattern:
        raise ConfigError(f"{key}=regex: needs a pattern, e.g. regex:answer is (\\w+)")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"{key}=regex:{pattern!r} is not a valid regular expression ({error})") from None


# ------------------------------------------------------------------------------------------------- sections

@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    """Which model to fine-tune and how to run it."""

    SECTION: ClassVar[str] = "model"
    path: str | None = None  # HF directory (a config.json alone is enough for `sftjax plan`), GGUF file or alias
    init: dict | None = None  # ModelConfig fields of a random-init model (tests, demos)
    param_dtype: Literal[DTYPES] = "float32"  # master weights
    compute_dtype: Literal[DTYPES] = "float32"  # forward/backward
    remat: Literal[REMAT_POLICIES] = "none"  # per decoder layer (or scanned period)
    attention_implementation: Literal[ATTENTION_IMPLEMENTATIONS] | None = "auto"  # pallas_kernels.attention
    cross_entropy_implementation: Literal[CROSS_ENTROPY_IMPLEMENTATIONS] | None = "auto"  # the fused loss
    scan_layers: bool = False  # stack the layers and run them with lax.scan (faster compiles of deep models)
    # frozen base of attention/MLP linears and MoE experts in bitsandbytes' format (QLoRA; needs lora.enabled):
    # none, nf4, int8
    quantize: Literal[QUANTIZE] = "none"
    double_quant: bool = False  # nf4 only: quantize the per-block absmax values too (bitsandbytes' compress_statistics)
    # MoE models: run-time switches of every MoE block over the checkpoint's (router_aux_loss_coef,
    # router_z_loss_coef, implementation: auto | ragged_dot | dense | megablox | megablox_interpret)
    moe: dict = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        if self.double_quant and self.quantize != "nf4":
            raise ConfigError(f"model.double_quant=true needs model.quantize=nf4 (got {self.quantize!r})")
        for key, value in self.moe.items():
            if key not in MOE_OVERRIDES:
                close = difflib.get_close_matches(str(key), MOE_OVERRIDES, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(MOE_OVERRIDES)}"
                raise ConfigError(f"model.moe has unknown key {key!r}; {hint}")
            if key == "implementation":
                if value not in MOE_IMPLEMENTATIONS:
                    raise ConfigError(f"model.moe.implementation={value!r} is not one of {', '.join(MOE_IMPLEMENTATIONS)}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"model.moe.{key}={value!r} must be a number >= 0")

    @property
    def attention(self) -> str | None:
        """The attention implementation to pass on: None = automatic."""
        return kernel_choices.explicit(self.attention_implementation)

    @property
    def cross_entropy(self) -> str | None:
        return kernel_choices.explicit(self.cross_entropy_implementation)


@dataclasses.dataclass(frozen=True)
class TokenizerSection(Section):
    SECTION: ClassVar[str] = "tokenizer"
    path: str | None = None  # default: the model's own tokenizer


@dataclasses.dataclass(frozen=True)
class SourceConfig(Section):
    """One dataset file or directory and how to read its rows."""

    SECTION: ClassVar[str] = "data.sources[]"
    SHORTHAND: ClassVar[str] = "path"
    path: str  # a .jsonl/.json/.parquet/.csv/.tsv file or a `datasets.save_to_disk` directory
    weight: float = 1.0  # examples per epoch = round(weight x rows): 2.0 repeats the source, 0.5 samples half
    format: Literal[FORMATS] = "auto"  # auto: detected from the row's columns (sftjax.data.formats)
    columns: dict = dataclasses.field(default_factory=dict)  # canonical name -> column in the file
    json_field: str | None = None  # the key holding the rows in a JSON file that wraps them
    split: str | None = None  # of a `datasets.save_to_disk` DatasetDict
    system_prompt: str | None = None  # a system message for rows that bring none

    def check(self) -> None:
        where = f"source {self.path!r}: "
        if not self.path:
            raise ConfigError(f"{self.SECTION}.path={self.path!r} must be a non-empty string")
        if not self.weight > 0:
            raise ConfigError(f"{where}weight={self.weight!r} must be a positive number")
        for key, value in self.columns.items():
            if key not in COLUMN_KEYS:
                close = difflib.get_close_matches(str(key), COLUMN_KEYS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(COLUMN_KEYS)}"
                raise ConfigError(f"{where}columns has unknown key {key!r}; {hint}")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}columns.{key}={value!r} must be a column name (string)")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Training (and eval) data: sources, masking, packing and loader settings."""

    SECTION: ClassVar[str] = "data"
    sources: tuple[SourceConfig, ...]  # training datasets: paths, or mappings with the keys of data.sources[]
    eval_sources: tuple[SourceConfig, ...] = ()  # held-out datasets; when given, eval_fraction is ignored
    eval_fraction: float = 0.0  # share of every training source held out for eval (split before packing)
    seed: int = 0  # the eval split, the mixing of sources by weight and the row order per epoch
    max_length: int = 2048  # tokens per packed row
    masking: Literal[MASKINGS] = "auto"  # trained tokens; auto: completion for prompt/completion rows, else assistant
    chat_template: str | None = None  # a Jinja file or inline template; default: the tokenizer's
    # reasoning (reasoning_content/thinking) where the template renders it: all, last (final message), none
    train_reasoning: Literal[REASONING] = "all"
    packing: Literal[PACKINGS] = "best"  # best: exact fill or repaired BFD, whichever needs fewer rows
    overflow: Literal[OVERFLOWS] = "truncate"  # examples longer than max_length: keep the start, split, or drop
    on_bad_row: Literal[ON_BAD_ROW] = "error"  # error: stop at a malformed row; skip: drop it and count it
    num_workers: int = 0  # tokenizer processes; 0: one per core (at most 16) from 20,000 rows, else in-process
    cache_dir: str | None = None  # tokenized-data cache; default $SFTJAX_CACHE_DIR or ~/.cache/sftjax/tokenized
    shuffle: bool = True  # a seeded new order of the packed rows every epoch
    prefetch: int = 2  # batches prepared ahead by background threads

    def check(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty; give at least one dataset path")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction!r} must be a number in [0, 1)")
        for key, minimum in (("max_length", 1), ("num_workers", 0), ("prefetch", 0)):
            if getattr(self, key) < minimum:
                raise ConfigError(f"data.{key}={getattr(self, key)!r} must be an integer >= {minimum}")
        if self.chat_template is not None and not self.chat_template:
            raise ConfigError(f"data.chat_template={self.chat_template!r} must be a file path or inline Jinja")


@dataclasses.dataclass(frozen=True)
class LoraSection(Section):
    """PEFT-style LoRA adapters; disabled = full fine-tuning."""

    SECTION: ClassVar[str] = "lora"
    enabled: bool = False  # false: full fine-tuning (every parameter trains)
    r: int = 8  # adapter rank
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # on the adapter's input, in training only
    rslora: bool = False  # rank-stabilized scale alpha / sqrt(r)
    target_modules: list[str] | str = "all-linear"  # names/regexes, or all-linear
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # regexes of fully trained params
    use_dora: bool = False  # DoRA: a trained magnitude per output feature (peft's use_dora)
    # adapter init (peft's init_lora_weights): default (kaiming A, B = 0), gaussian, pissa or olora (SVD / QR of the
    # weight; the base keeps the residual)
    init: Literal[LORA_INITS] = "default"
    lr_ratio: float | None = None  # LoRA+: the lora_b (and 1-D adapter) learning rate = optim.learning_rate x this

    def __post_init__(self):
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            object.__setattr__(self, "target_modules", [self.target_modules])  # one name = a list of one
        super().__post_init__()

    def check(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r={self.r!r} must be an integer >= 1")
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if self.lr_ratio is not None and not self.lr_ratio > 0:
            raise ConfigError(f"lora.lr_ratio={self.lr_ratio!r} must be a number > 0 (or null: no LoRA+)")


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
    """Optimizer, learning-rate schedule and gradient clipping."""

    SECTION: ClassVar[str] = "optim"
    name: Literal["adamw", "adafactor", "sgd"] = "adamw"  # the optax optimizer
    learning_rate: float = 1e-4  # peak learning rate, reached at the end of warmup
    schedule: Literal["constant", "linear", "cosine"] = "cosine"  # after warmup: constant, or decay to the minimum
    warmup_steps: int = 0  # linear warmup from 0
    warmup_ratio: float = 0.0  # warmup as a share of all steps, used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # final lr = learning_rate * min_lr_ratio (linear/cosine)
    weight_decay: float = 0.0  # not applied to the no_decay parameters
    # regexes over parameter paths that get no weight decay (norms, biases, embeddings by default)
    no_decay: list[str] = dataclasses.field(default_factory=lambda: ["norm", "bias", "embed"])
    b1: float = 0.9  # adamw
    b2: float = 0.999  # adamw
    eps: float = 1e-8  # adamw
    momentum: float = 0.0  # sgd
    max_grad_norm: float | None = 1.0  # null: no clipping
    z_loss: float = 0.0  # coefficient of the logsumexp(logits)^2 penalty per trained token

    def check(self) -> None:
        _positive("optim.learning_rate", self.learning_rate)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        for key in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} must be in [0, 1]")
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} must be in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"optim.max_grad_norm={self.max_grad_norm!r} must be > 0 or null (no clipping)")
        _positive("optim.z_loss", self.z_loss, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
    """Device mesh sizes; -1 = all remaining devices."""

    SECTION: ClassVar[str] = "train.mesh"
    data: int = -1  # data parallelism: batch rows split, weights replicated
    fsdp: int = 1  # batch rows split and weights (and optimizer state) sharded, gathered for use
    tensor: int = 1  # heads, MLP and vocabulary split (tensor parallelism)

    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def check(self) -> None:
        sizes = self.sizes()
        if sum(1 for v in sizes.values() if v == -1) > 1:
            raise ConfigError(f"train.mesh={sizes} may use -1 for at most one axis")
        for key, value in sizes.items():
            if value == 0 or value < -1:
                raise ConfigError(f"train.mesh.{key}={value!r} must be a positive integer or -1")

    def resolve(self, device_count: int) -> dict[str, int]:
        """Concrete axis sizes for ``device_count`` devices (one-line error when they do not fit)."""
        sizes = self.sizes()
        fixed = 1
        for value in sizes.values():
            fixed *= value if value != -1 else 1
        if device_count % fixed:
            raise ConfigError(f"train.mesh={sizes} needs a multiple of {fixed} devices; {device_count} available")
        sizes = {key: device_count // fixed if value == -1 else value for key, value in sizes.items()}
        if sizes["data"] * sizes["fsdp"] * sizes["tensor"] != device_count:
            raise ConfigError(f"train.mesh={sizes} uses {sizes['data'] * sizes['fsdp'] * sizes['tensor']} devices; "
                              f"{device_count} available (use -1 for one axis)")
        return sizes


@dataclasses.dataclass(frozen=True)
class TrainSection(Section):
    """Loop length, batch geometry, cadence and outputs."""

    SECTION: ClassVar[str] = "train"
    steps: int | None = None  # optimizer steps; takes precedence over epochs
    epochs: float | None = None  # passes over the packed training rows (when steps is not given)
    global_batch_size: int = 8  # rows per optimizer step, over all devices and hosts
    micro_batch_size: int | None = None  # rows per accumulation micro-batch (global); default = global
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int | None = None  # cap on eval batches per evaluation (None = all)
    generate_eval_every: int = 0  # decode eval prompts and log eval/accuracy every N steps (0 = never)
    generate_eval_answer: str = "exact"  # exact | number | gsm8k | regex:PATTERN
    generate_eval_limit: int | None = 32  # eval examples decoded per generation eval (None = all)
    generate_eval_max_new_tokens: int = 128  # answer length limit of the generation eval
    log_every: int = 10  # 0 = every step
    seed: int = 0  # random init, LoRA init and dropout
    output_dir: str = "runs/default"  # metrics.jsonl, tensorboard/, checkpoints/ and final/ (the trained model)
    save: Literal["merged", "adapter", "none"] = "merged"  # final/: merged HF weights, a PEFT adapter, or nothing
    progress: bool = True  # a progress bar with loss, tokens/s, MFU and ETA
    tensorboard: bool | None = None  # TensorBoard events in <output_dir>/tensorboard; None: when tensorboardX is installed
    loggers: tuple[Literal["jsonl", "tensorboard", "wandb", "mlflow"], ...] = ()  # where metrics go besides metrics.jsonl (always written): tensorboard (= tensorboard: true), wandb (pip install wandb), mlflow (pip install mlflow)
    run_name: str | None = None  # the W&B / MLflow run name; None: the last part of output_dir (a resumed run logs as a new run)
    wandb_project: str = "sftjax"  # W&B project (loggers: [wandb])
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: run files in <output_dir>/wandb (upload later with wandb sync)
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a file store in <output_dir>/mlruns
    mlflow_experiment: str = "sftjax"  # MLflow experiment name (loggers: [mlflow])
    peak_flops: float | None = None  # per device; default: the datasheet table (none for a CPU: no MFU there)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)  # device mesh axis sizes (train.mesh)
    distributed: Literal["auto", "on", "off"] = "auto"  # join a multi-process job (sftjax.train.distributed)

    def check(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.steps={self.steps!r} must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"train.epochs={self.epochs!r} must be > 0")
        if self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size!r} must be >= 1")
        micro = self.micro_rows
        if micro < 1 or self.global_batch_size % micro:
            raise ConfigError(f"train.micro_batch_size={micro!r} must divide "
                              f"train.global_batch_size={self.global_batch_size}")
        for key in ("eval_every", "log_every", "generate_eval_every"):
            _positive(f"train.{key}", getattr(self, key), allow_zero=True)
        check_answer_spec(self.generate_eval_answer, "train.generate_eval_answer")
        _positive("train.generate_eval_limit", self.generate_eval_limit)
        _positive("train.generate_eval_max_new_tokens", self.generate_eval_max_new_tokens)
        if "tensorboard" in self.loggers and self.tensorboard is False:
            raise ConfigError("train.loggers lists tensorboard but train.tensorboard=false; drop one of them")
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"train.loggers={list(self.loggers)!r} names a logger twice")

    @property
    def micro_rows(self) -> int:
        """Rows per accumulation micro-batch (global)."""
        return self.micro_batch_size if self.micro_batch_size is not None else self.global_batch_size

    @property
    def accum_steps(self) -> int:
        return self.global_batch_size // self.micro_rows

    @property
    def log_interval(self) -> int:
        return max(1, self.log_every)


@dataclasses.dataclass(frozen=True)
class CheckpointSection(Section):
    """Checkpoints of a run (:mod:`sftjax.train.checkpoint`)."""

    SECTION: ClassVar[str] = "checkpoint"
    directory: str | None = None  # default: <train.output_dir>/checkpoints
    save_every_steps: int | None = None  # null: no step trigger
    save_every_minutes: float | None = 30.0  # null: no time trigger; the last step is always saved
    keep: int | None = 3  # newest checkpoints kept (null: all)
    keep_best: int = 0  # also keep this many with the lowest eval_loss
    resume: str = "auto"  # auto | never | <path to a run, checkpoint root or step directory>
    async_save: bool = True  # write in a background thread while training goes on

    def check(self) -> None:
        for key in ("save_every_steps", "save_every_minutes", "keep"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"checkpoint.{key}={value!r} must be a positive number or null")
        _positive("checkpoint.keep_best", self.keep_best, allow_zero=True)
        if not self.resume:
            raise ConfigError(f"checkpoint.resume={self.resume!r} must be auto, never or a path")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run; ``data`` is None for tools that need no data (plan, export, generate)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    data: DataConfig | None = None
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    source_path: str | None = None

    def check_devices(self, device_count: int) -> dict[str, int]:
        """Resolve the mesh and check the batch splits evenly over its batch axes; returns the mesh sizes."""
        sizes = self.train.mesh.resolve(device_count)
        shards = sizes["data"] * sizes["fsdp"]
        if self.train.micro_rows % shards:
            raise ConfigError(f"train.micro_batch_size={self.train.micro_rows} (global_batch_size="
                              f"{self.train.global_batch_size} / accumulation) is not divisible by the "
                              f"{shards} batch shards (mesh data*fsdp over {device_count} devices)")
        return sizes

    def to_dict(self) -> dict:
        """The run as plain YAML/JSON values (what a checkpoint's meta stores)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "source_path"}

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


SECTIONS = {"model": ModelSection, "tokenizer": TokenizerSection, "data": DataConfig, "lora": LoraSection,
            "optim": OptimSection, "train": TrainSection, "checkpoint": CheckpointSection}


def check_sections(cfg: Config) -> None:
    """Rules between sections (one ConfigError line each)."""
    lora = cfg.lora
    if cfg.model.quantize != "none" and not lora.enabled:
        raise ConfigError(f"model.quantize={cfg.model.quantize} needs lora.enabled=true: a quantized base is frozen "
                          "(full fine-tuning of it is not supported)")
    if not lora.enabled:
        for key, default in (("use_dora", False), ("init", "default"), ("lr_ratio", None)):
            if getattr(lora, key) != default:
                raise ConfigError(f"lora.{key}={getattr(lora, key)!r} needs lora.enabled=true")


# ------------------------------------------------------------------------------------------------- loading

PURPOSES = ("train", "model", "data")


def config_from_dict(raw: dict, *, source_path: str | None = None, purpose: str = "train") -> Config:
    """Build and validate a :class:`Config` from a plain mapping (the parsed YAML).

    ``purpose="train"`` (every command that trains or plans) requires a model and a run length; ``"model"`` (a
    checkpoint's saved run config, for export) a model only; ``"data"`` (``sftjax data preview``) only the data
    section, and also accepts a YAML that is just the data section.
    """
    where = source_path or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    if purpose == "data" and raw and not set(raw) & set(SECTIONS):
        raw = {"data": raw}  # a bare data section
    for key in raw:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known sections: {', '.join(SECTIONS)}"
            raise ConfigError(f"unknown config section {key!r}; {hint}")
    sections = {name: _build(cls, raw.get(name), name) for name, cls in SECTIONS.items() if name != "data"}
    data = _build(DataConfig, raw["data"], "data") if raw.get("data") is not None else None
    cfg = Config(data=data, source_path=source_path, **sections)
    check_sections(cfg)
    if purpose not in PURPOSES:
        raise ValueError(f"config_from_dict: purpose={purpose!r} is not one of {PURPOSES}")
    if purpose in ("train", "model") and (cfg.model.path is None) == (cfg.model.init is None):
        raise ConfigError("model: give exactly one of model.path (checkpoint/alias) or model.init (random init)")
    if purpose == "train" and cfg.train.steps is None and cfg.train.epochs is None:
        raise ConfigError("train: give train.steps or train.epochs")
    if purpose == "data" and cfg.data is None:
        raise ConfigError(f"{where}: no data: section (data.sources is required)")
    return _resolve_relative_paths(cfg)


def _resolve_relative_paths(cfg: Config) -> Config:
    """Relative paths that do not exist from the working directory, tried relative to the config file's folder."""
    if cfg.source_path is None:
        return cfg
    base = pathlib.Path(cfg.source_path).resolve().parent

    def fix(path: str | None) -> str | None:
        if not path or os.path.isabs(path) or os.path.exists(path) or "{" in path:
            return path
        candidate = base / path
        return str(candidate) if candidate.exists() else path

    model = dataclasses.replace(cfg.model, path=fix(cfg.model.path))
    tokenizer = dataclasses.replace(cfg.tokenizer, path=fix(cfg.tokenizer.path))
    data = cfg.data
    if data is not None:
        data = dataclasses.replace(
            data, chat_template=fix(data.chat_template),
            sources=tuple(dataclasses.replace(s, path=fix(s.path)) for s in data.sources),
            eval_sources=tuple(dataclasses.replace(s, path=fix(s.path)) for s in data.eval_sources))
    return cfg.replace(model=model, tokenizer=tokenizer, data=data)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                purpose: str = "train") -> Config:
    """Read a YAML config (or start empty when ``path`` is None), apply overrides, validate (see
    :func:`config_from_dict` for ``purpose``)."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source_path=str(path) if path is not None else None, purpose=purpose)
