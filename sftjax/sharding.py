"""Meshes and the logical-axis -> mesh-axis rules.

Parameters carry logical axis names (``logical_axes`` metadata: ``embed``, ``vocab``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``norm``). One rules table maps them to the mesh axes ``data``, ``fsdp``, ``tensor``:
weights are split over ``fsdp`` along their model dimension and over ``tensor`` along heads / MLP / vocab.
A dimension that the mesh axis does not divide is replicated instead, so any mesh works for any model.

FSDP means a weight is stored split over ``fsdp`` but used whole: :func:`gather_for_compute` makes that gather
explicit inside the model (every Linear/Embed/RMSNorm weight right before its use). Besides stating the intent,
it keeps XLA off a mis-partitioning: in jax 0.10.2 (Shardy and GSPMD alike, so in the shared SPMD partitioner)
the input-gradient matmul (dy @ W.T) of a kernel W [in, out] split (fsdp, tensor), with the batch split over
(data, fsdp) one row per shard, gets a collective-permute of the cotangent's batch shards and no permute back, so
gradient rows of different shards swap (loss right, gradients upstream of W wrong).
``scripts/repro_xla_spmd_row_swap.py`` is the standalone reproduction; ``tests/train/test_sharded_gradients.py``
guards the workaround.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the rows of every batch are split over these (data parallelism + FSDP)

LOGICAL_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,  # the stacked-layers axis of scanned models (sftjax.models.scan): never split
    # MoE experts: split over fsdp, each rank keeping its experts whole (sftjax.models.moe_sharding explains why)
    "expert": "fsdp",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 meaning "all remaining devices"."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices")
    device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def partition_spec(logical_axes, shape, mesh: Mesh, rules: dict | None = None) -> PartitionSpec:
    """PartitionSpec for one array; axes whose size the mesh axis does not divide stay replicated."""
    rules = LOGICAL_RULES if rules is None else rules
    spec, used = [], set()
    for name, size in zip(logical_axes or (None,) * len(shape), shape):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis not in mesh.shape or mesh_axis in used or size % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def gather_for_compute(value, logical_axes, rules: dict | None = None):
    """``value`` constrained to its rules layout with ``fsdp`` gathered: the explicit FSDP all-gather.

    Why it exists: see the module docstring (an XLA SPMD bug swaps gradient rows without it). A no-op unless
    ``value`` lives on a mesh with an ``fsdp`` axis of size > 1 (single device, eager or jitted, is untouched).
    """
    mesh = getattr(getattr(jax.typeof(value), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or mesh.shape.get("fsdp", 1) == 1:
        return value
    rules = LOGICAL_RULES if rules is None else rules
    compute_rules = {name: (None if axis == "fsdp" else axis) for name, axis in rules.items()}
    spec = partition_spec(logical_axes, value.shape, mesh, compute_rules)
    return jax.lax.with_sharding_constraint(value, NamedSharding(mesh, spec))


def to_host(value) -> np.ndarray:
    """The whole of ``value`` as a numpy array on this host. An array spread over several processes is gathered
    with a collective, so with several processes every process must call this, for the same arrays, in the same
    order (exporters do: all processes walk the tensors, process 0 writes)."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(jax.device_get(value))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def writes_files() -> bool:
    """Whether this process writes shared outputs (exported models, metrics): process 0 only."""
    return jax.process_index() == 0


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: dict | None = None) -> NamedSharding:
    logical = variable.get_metadata().get("logical_axes")
    shape = variable.get_value().shape
    return NamedSharding(mesh, partition_spec(logical, shape, mesh, rules))


def parameter_shardings(model: nnx.Module, mesh: Mesh, rules: dict | None = None):
    """An nnx.State of NamedShardings mirroring ``nnx.state(model)`` (use with jax.device_put / jit)."""
    state = nnx.state(model)

    def to_sharding(variable):
        return variable.replace(variable_sharding(variable, mesh, rules))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: dict | None = None) -> nnx.Module:
    """Move every variable of ``model`` to its NamedSharding in place; returns the model."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            node.set_value(jax.device_put(node.get_value(), variable_sharding(node, mesh, rules)))
    return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a [B, L] batch split over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
