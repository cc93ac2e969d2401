"""``sftjax plan --compile``: XLA's own memory analysis of the real train step, next to the estimate.

The step is lowered and compiled for this machine's devices from abstract, sharded inputs (no weights are read,
no data is loaded); ``memory_analysis()`` then says what XLA will allocate per device on this backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sftjax.config import Config
from sftjax.errors import ConfigError
from sftjax.plan import _max_length, _variable_specs, abstract_model, model_config_of, optimizer_state_specs


def compile_memory(config: Config, *, seq_len: int | None = None) -> dict:
    """Lower and compile the real train step for this backend's devices from abstract inputs (no weights, no
    data) and return XLA's ``memory_analysis()`` per device."""
    from jax.sharding import NamedSharding, PartitionSpec

    from pallas_kernels import dispatch
    from sftjax.sharding import make_mesh
    from sftjax.peft.lora import split_model
    from sftjax.train.optim import make_optimizer
    from sftjax.train.step import LossOptions, TrainState, make_train_step

    cfg = config
    mesh_sizes = cfg.check_devices(jax.device_count())
    mesh = make_mesh(**mesh_sizes)
    if cfg.model.remat == "offload_dots":
        from sftjax.models.decoder import remat_policy

        remat_policy(cfg.model.remat)  # one-line error on a backend without pinned host memory
    mc = model_config_of(cfg)
    graphdef, trainable, frozen = split_model(abstract_model(cfg, mc), cfg.lora)
    trainable_abs, frozen_abs = _place_state(trainable, mesh), _place_state(frozen, mesh)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps or 1000)
    state_abs = jax.eval_shape(lambda p: TrainState.create(p, tx), trainable)
    train_entries = _variable_specs(trainable, mesh)
    opt_entries = optimizer_state_specs(state_abs.opt_state, train_entries)
    opt_leaves = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))
                  for _, leaf, spec in opt_entries]
    opt_abs = jax.tree.unflatten(jax.tree.structure(state_abs.opt_state), opt_leaves)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    state_abs = TrainState(step=scalar, params=trainable_abs, opt_state=opt_abs, nonfinite_steps=scalar)
    options = LossOptions(logit_softcap=mc.final_logit_softcap, z_loss=cfg.optim.z_loss,
                          compute_dtype=jnp.dtype(cfg.model.compute_dtype),
                          cross_entropy_implementation=cfg.model.cross_entropy_implementation,
                          dropout=cfg.lora.enabled and cfg.lora.dropout > 0)
    step = make_train_step(graphdef, tx, schedule, options, max_grad_norm=cfg.optim.max_grad_norm,
                           param_shardings=jax.tree.map(lambda x: x.sharding, trainable_abs),
                           state_shardings=jax.tree.map(lambda x: x.sharding, state_abs))
    length = _max_length(cfg, seq_len)
    accum = cfg.train.accum_steps
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
    batch = {key: jax.ShapeDtypeStruct((accum, cfg.train.micro_batch_size, length), jnp.int32,
                                       sharding=batch_sharding)
             for key in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    with dispatch.use_implementation("attention", cfg.model.attention_implementation), \
            dispatch.use_implementation("cross_entropy", cfg.model.cross_entropy_implementation):
        compiled = step.lower(state_abs, frozen_abs, batch, rng).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise ConfigError(f"--compile: the {jax.default_backend()} backend gives no memory analysis")
    out = {"backend": jax.default_backend(), "devices": jax.device_count(), "mesh": mesh_sizes}
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes", "host_temp_size_in_bytes"):
        value = getattr(analysis, field, None)
        if value is not None:
            out[field.replace("_size_in_bytes", "_bytes")] = int(value)
    out["peak_estimate_bytes"] = (out.get("argument_bytes", 0) + out.get("output_bytes", 0)
                                  - out.get("alias_bytes", 0) + out.get("temp_bytes", 0))
    return out


def _place_state(state, mesh):
    """An nnx.State of abstract values given the rules' NamedShardings on ``mesh``."""
    from jax.sharding import NamedSharding

    from sftjax.sharding import partition_spec

    def place(variable):
        value = variable.get_value()
        spec = partition_spec(variable.get_metadata().get("logical_axes"), value.shape, mesh)
        return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))

    return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
