"""The run recipe: everything a config turns into before the first step, built in one place.

Design in plain words
---------------------
Training, ``sftjax plan``, ``plan --compile`` (AOT compilation for a TPU or GPU target), ``export`` and the
benchmarks all need the same thing: the model with its run-time options, LoRA attached, the layers stacked for
scan, everything placed on the mesh by the sharding rules, the state split into what trains and what stays
frozen, the optimizer and its state, the loss options, and the jitted train and eval steps. ``build_program``
makes all of it, in this order and nowhere else:

1. the model: random init (``model.init``, seeded) or loaded (``model.path``) -- or, **abstract**, the same model
   as shapes only (``nnx.eval_shape``; a ``model.path`` contributes only its config.json or GGUF metadata, never a
   weight), with the compute dtype, remat policy and attention implementation of ``model:``;
2. LoRA adapters (``peft.lora.apply_lora``), the quantized base (``model.quantize``, QLoRA; see ``adapt`` for the
   order), then the layers stacked (``model.scan_layers``), then every variable
   placed by the rules (``sharding.shard_model``; abstract: a ``ShapeDtypeStruct`` carrying its ``NamedSharding``);
3. ``split_model`` -> (graphdef, trainable, frozen); the optax transformation and schedule; the ``TrainState``
   (abstract: ``eval_shape`` of its creation, optimizer leaves laid out like their parameters);
4. the jitted steps with the state's shardings, and the batch shardings (rows over ``sharding.BATCH_AXES``).

An abstract program never allocates a weight, so it plans or AOT-compiles a 70B run on a laptop:
``program.lower(max_length)`` gives the lowered train step for ``.compile()``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sftjax.config import Config
from sftjax.errors import ConfigError
from sftjax.models import gguf_read, hf_io
from sftjax.models.config import ModelConfig
from sftjax.models.decoder import Decoder, remat_policy, with_moe_overrides
from sftjax.models.loading import load_model
from sftjax.models.moe_sharding import expert_parallel_size
from sftjax.models.registry import family_for_hf
from sftjax.models.scan import stack_layers
from sftjax.models.zoo import resolve_model_path
from sftjax.peft.lora import apply_lora, linear_modules, split_model
from sftjax.peft.quant import check_trainable, quantize_model
from sftjax.sharding import BATCH_AXES, partition_spec, shard_model
from sftjax.train.optim import make_optimizer, path_string
from sftjax.train.step import LossOptions, TrainState, make_eval_step, make_train_step

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


# --------------------------------------------------------------------------------------------------- model

def check_expert_mesh(model_config: ModelConfig, mesh: Mesh) -> None:
    """A one-line ConfigError, before any compile, when the mesh's expert axis does not divide the expert count."""
    if model_config.moe is not None:
        expert_parallel_size(mesh, model_config.moe.num_experts)


def _runtime(cfg: Config) -> dict:
    section = cfg.model
    return {"dtype": section.compute_dtype, "param_dtype": section.param_dtype, "remat": section.remat}


def model_config_for(cfg: Config, *, tokenizer=None, vocab_size: int | None = None) -> ModelConfig:
    """The run's ModelConfig with its run-time fields, from ``model.init`` or from ``model.path``'s config alone.

    A random-init model without ``vocab_size`` takes it from ``vocab_size`` or the tokenizer (one-line error when
    neither is there)."""
    section = cfg.model
    if section.init is not None:
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in section.init.items()}
        if "vocab_size" not in spec:
            if vocab_size is None and tokenizer is None:
                raise ConfigError("model.init has no vocab_size and there is no tokenizer to take it from "
                                  "(set model.init.vocab_size or tokenizer.path)")
            spec["vocab_size"] = vocab_size if vocab_size is not None else len(tokenizer)
        spec.update(_runtime(cfg))
        try:
            return with_moe_overrides(ModelConfig(**spec), cfg.model.moe)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.init: {str(err).splitlines()[0]}") from None
    path = resolve_model_path(section.path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        hf_config, tensors = gguf_read.read_gguf_checkpoint(path)  # metadata only: the iterator is never started
        del tensors
        source = str(path)
    else:
        hf_config = hf_io.read_config_json(path)
        source = str(path / "config.json")
    config = family_for_hf(hf_config, source=source).config_from_hf(hf_config, source=source).replace(**_runtime(cfg))
    return with_moe_overrides(config, cfg.model.moe)


def build_model(cfg: Config, *, mesh: Mesh | None = None, tokenizer=None) -> tuple[Decoder, ModelConfig]:
    """(model, model_config) with real weights: ``model.init`` (seeded) or loaded from ``model.path``."""
    if cfg.model.init is not None:
        model_config = model_config_for(cfg, tokenizer=tokenizer)
        model = Decoder(model_config, rngs=nnx.Rngs(params=cfg.train.seed), attention_implementation=cfg.model.attention)
        if mesh is not None:
            shard_model(model, mesh)
        return model, model_config
    if mesh is not None:  # before any weight is read
        check_expert_mesh(model_config_for(cfg, tokenizer=tokenizer), mesh)
    model, model_config = load_model(cfg.model.path, dtype=jnp.dtype(cfg.model.param_dtype), mesh=mesh)
    model.configure(remat=cfg.model.remat, attention_implementation=cfg.model.attention, dtype=cfg.model.compute_dtype,
                    moe=cfg.model.moe)
    return model, model.config


def adapt(model: Decoder, cfg: Config) -> list[str]:
    """LoRA adapters attached (seeded, initialized per ``lora.init``), then the base quantized when
    ``model.quantize`` (after the init: PiSSA/OLoRA residuals are computed on the full-precision weight), then
    DoRA's magnitude (measured on the quantized weight, as peft does on a bitsandbytes layer), then the layers
    stacked when ``model.scan_layers`` (quantized arrays stack like any other); returns the adapted module paths.
    Call ``shard_model`` afterwards (the new variables are not on the mesh yet)."""
    seed = cfg.train.seed
    quantize = cfg.model.quantize != "none"
    targets = apply_lora(model, cfg.lora, rngs=nnx.Rngs(params=seed + 1, dropout=seed + 2),
                         dora=cfg.lora.use_dora and not quantize)
    if quantize:
        quantize_model(model, cfg.model.quantize, double_quant=cfg.model.double_quant)
        check_trainable(model, lora_enabled=cfg.lora.enabled, modules_to_save=cfg.lora.modules_to_save)
        if cfg.lora.use_dora:
            modules = linear_modules(model)
            for name in targets:
                modules[name].enable_dora()
    if cfg.model.scan_layers:
        stack_layers(model)
    return targets


def abstract_model(cfg: Config, model_config: ModelConfig) -> tuple[Decoder, list[str]]:
    """The adapted model as shapes only (no memory), and the adapted module paths."""
    targets: list[str] = []

    def build():
        model = Decoder(model_config, rngs=nnx.Rngs(params=cfg.train.seed), attention_implementation=cfg.model.attention)
        targets.extend(adapt(model, cfg))
        return model

    return nnx.eval_shape(build), targets


def place_abstract(state, mesh: Mesh):
    """An nnx.State of abstract values given the rules' NamedShardings on ``mesh``."""
    def place(variable):
        value = variable.get_value()
        spec = partition_spec(variable.get_metadata().get("logical_axes"), value.shape, mesh)
        return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))

    return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_leaf_specs(opt_state, params) -> list[PartitionSpec]:
    """A PartitionSpec per optimizer-state leaf: a leaf whose path ends with a parameter's path and has its shape
    is laid out like that parameter (what ``zeros_like`` of a sharded array gives); factored statistics and
    counters are replicated. ``params`` holds values with a ``.sharding`` (abstract or real)."""
    def names(key_path) -> tuple[str, ...]:
        parts = tuple(path_string(key_path).split("/"))
        return parts[:-1] if parts and parts[-1] == "value" else parts

    by_path = {names(key_path): leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    specs = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names_ = names(key_path)
        spec = PartitionSpec()
        for start in range(len(names_)):
            match = by_path.get(names_[start:])
            if match is not None and tuple(match.shape) == tuple(leaf.shape):
                spec = match.sharding.spec
                break
        specs.append(spec)
    return specs


# ------------------------------------------------------------------------------------------------- program

@dataclasses.dataclass
class Program:
    """A built run: see the module docstring. Abstract programs hold ShapeDtypeStructs instead of arrays."""

    config: Config
    mesh: Mesh
    model_config: ModelConfig
    graphdef: Any
    trainable: Any  # nnx.State
    frozen: Any
    state: TrainState
    tx: Any
    schedule: Callable
    loss: LossOptions
    train_step: Callable
    eval_step: Callable
    lora_targets: list[str]
    total_steps: int
    abstract: bool
    model: Decoder | None = None  # the adapted model (shapes only in an abstract program)

    @property
    def batch_sharding(self) -> NamedSharding:
        """[accum, micro_rows, L] train batches: rows over the batch axes."""
        return NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES, None))

    @property
    def eval_sharding(self) -> NamedSharding:
        """[rows, L] eval batches."""
        return NamedSharding(self.mesh, PartitionSpec(BATCH_AXES, None))

    def batch_spec(self, max_length: int) -> dict:
        """Abstract train batch of the config's geometry: [accum, micro_rows, L] int32 per key."""
        train = self.config.train
        shape = (train.accum_steps, train.micro_rows, max_length)
        return {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for key in BATCH_KEYS}

    def abstract_arguments(self, max_length: int) -> tuple:
        """(state, frozen, batch, rng) as sharded ShapeDtypeStructs: the train step's arguments, for lowering."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        key = jax.eval_shape(lambda: jax.random.key(0))
        rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
        state = self.state if self.abstract else jax.tree.map(_as_abstract, self.state)
        frozen = self.frozen if self.abstract else jax.tree.map(_as_abstract, self.frozen)
        return state, frozen, self.batch_spec(max_length), rng

    def lower(self, max_length: int):
        """The train step lowered for the program's mesh (call ``.compile()`` for XLA's analyses)."""
        return self.train_step.lower(*self.abstract_arguments(max_length))

    @property
    def num_params(self) -> int:
        """Parameters of the model (LoRA adapters included)."""
        states = (self.trainable, self.frozen)
        return int(sum(math.prod(x.shape) for s in states for x in jax.tree.leaves(s)
                       if jnp.issubdtype(x.dtype, jnp.floating)))

    @property
    def num_trainable(self) -> int:
        return int(sum(math.prod(x.shape) for x in jax.tree.leaves(self.trainable)))


def _as_abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def check_backend(cfg: Config) -> None:
    """Fail now, not at the first trace, on options this backend cannot run (offload_dots without host memory)."""
    if cfg.model.remat == "offload_dots":
        remat_policy(cfg.model.remat)


def build_program(cfg: Config, *, mesh: Mesh, total_steps: int, abstract: bool = False, tokenizer=None,
                  model: Decoder | None = None, vocab_size: int | None = None) -> Program:
    """The run of ``cfg`` on ``mesh`` (see the module docstring). ``model``: an already built (unadapted) model to
    use instead of building one; ``abstract``: shapes and shardings only, no weights read."""
    if abstract:
        model_config = model_config_for(cfg, tokenizer=tokenizer, vocab_size=vocab_size)
        adapted, targets = abstract_model(cfg, model_config)
        graphdef, trainable, frozen = split_model(adapted, cfg.lora)
        trainable, frozen = place_abstract(trainable, mesh), place_abstract(frozen, mesh)
    else:
        if model is None:
            model, model_config = build_model(cfg, mesh=mesh, tokenizer=tokenizer)
        else:  # a model built elsewhere runs with this config's run-time options too
            model.configure(remat=cfg.model.remat, attention_implementation=cfg.model.attention,
                            dtype=cfg.model.compute_dtype, moe=cfg.model.moe)
            model_config = model.config
        targets = adapt(model, cfg)
        shard_model(model, mesh)
        adapted = model
        graphdef, trainable, frozen = split_model(model, cfg.lora)
    check_expert_mesh(model_config, mesh)
    tx, schedule = make_optimizer(cfg.optim, total_steps,
                                  lr_ratio=cfg.lora.lr_ratio if cfg.lora.enabled else None)
    replicated = NamedSharding(mesh, PartitionSpec())
    if abstract:
        created = jax.eval_shape(lambda p: TrainState.create(p, tx), trainable)
        leaves, tree = jax.tree.flatten(created.opt_state)
        specs = optimizer_leaf_specs(created.opt_state, trainable)
        opt_state = jax.tree.unflatten(tree, [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                   sharding=NamedSharding(mesh, spec))
                                              for leaf, spec in zip(leaves, specs)])
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        state = TrainState(step=scalar, params=trainable, opt_state=opt_state, nonfinite_steps=scalar)
    else:
        state = _place(TrainState.create(trainable, tx), mesh)
    loss = LossOptions(logit_softcap=model_config.final_logit_softcap, z_loss=cfg.optim.z_loss,
                       compute_dtype=jnp.dtype(cfg.model.compute_dtype),
                       cross_entropy_implementation=cfg.model.cross_entropy,
                       dropout=cfg.lora.enabled and cfg.lora.dropout > 0,
                       router_aux_loss_coef=model_config.moe.router_aux_loss_coef if model_config.moe else 0.0,
                       router_z_loss_coef=model_config.moe.router_z_loss_coef if model_config.moe else 0.0)
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    train_step = make_train_step(graphdef, tx, schedule, loss, max_grad_norm=cfg.optim.max_grad_norm,
                                 param_shardings=shardings(trainable), state_shardings=shardings(state))
    return Program(config=cfg, mesh=mesh, model_config=model_config, graphdef=graphdef, trainable=trainable,
                   frozen=frozen, state=state, tx=tx, schedule=schedule, loss=loss, train_step=train_step,
                   eval_step=make_eval_step(graphdef, loss), lora_targets=targets, total_steps=total_steps,
                   abstract=abstract, model=adapted)


def _place(tree, mesh: Mesh):
    """Every array on the mesh: sharded ones keep their layout, the rest (counters, scalars) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, tree)
