"""Expert parallelism: the routed experts of an MoE block computed per device under ``jax.shard_map``.

Which mesh axis splits the experts: **``fsdp``**, not a new axis. The batch rows are already split over
(``data``, ``fsdp``), so every ``fsdp`` rank holds its own tokens; splitting the ``expert`` dimension of the
stacked weights over the same axis lets each rank keep ``E / fsdp`` experts *whole* (never all-gathered, unlike
every other FSDP weight) and trade tokens with its ``fsdp`` peers instead. This is the usual "expert parallelism
over the data-parallel ranks" layout (DeepSpeed-MoE, GShard; MaxText names a separate ``expert`` mesh axis but
also shards the batch over it, which is the same thing under another name). A separate mesh axis would change
``MESH_AXES``, ``make_mesh``, ``batch_sharding`` and every config; reusing ``fsdp`` is one entry of the rules
table, ``"expert": "fsdp"`` (in ``sftjax.sharding.LOGICAL_RULES``; :data:`EXPERT_RULES` stays as its name here). The expert weights'
logical axes put ``expert`` first, so ``fsdp`` goes to it and their ``embed`` dimension stays whole; ``mlp`` is
split over ``tensor`` as in the dense MLP, and the down projection's partial sums are ``psum``'d over it.

Per device (inside the map; T local tokens, k slots, E_l = E / ep local experts):

1. Sort the T*k (token, slot) pairs by global expert id; padding pairs sort last and go nowhere. Experts are
   numbered so that device ``d`` owns ``[d * E_l, (d + 1) * E_l)``, hence the pairs bound for one device are
   contiguous.
2. **Dropless capacity.** The send buffer is ``[ep, C, D]`` with ``C = T * min(k, E_l)``: a token's k experts
   are distinct, so at most ``min(k, E_l)`` of its pairs go to one device, and C can never overflow. No counts
   need exchanging first; the price is buffers ep times the local pairs in the worst case (``ep * T * min(k,
   E_l)`` rows received). ``jax.lax.ragged_all_to_all`` would move only the real rows, but XLA:CPU cannot run it
   (UNIMPLEMENTED), so it could not be tested here; it is the natural next step for large expert-parallel TPU
   runs (the receive buffer keeps the same worst-case size either way, dropless).
3. ``all_to_all`` over ``fsdp`` sends slot ``[d]`` to device d (with the local expert id of each row, E_l for
   an empty row); the receiver sorts the ep*C rows by local expert and runs the grouped matmul (empty rows are
   in no group), un-sorts, and ``all_to_all`` returns each row to its sender, which un-sorts once more and
   combines the k outputs of each token with its routing weights.

The router, its statistics and the shared expert run outside the map (plain jnp that XLA partitions), so the
auxiliary losses are the same code on one device and on a mesh. Rows are split over the mesh axes among
(``data``, ``fsdp``) that divide the token count; when ``fsdp`` does not divide it the tokens are replicated
over ``fsdp`` and every rank exchanges the same tokens (correct, redundant). The map runs with
``check_vma=False`` like the Pallas kernels' maps (``pallas_kernels/sharding.py`` explains the transpose
semantics that this relies on; the tests check gradients against one device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels.sharding import ROW_AXES, find_mesh, spec_entry, split_axes
from sftjax.errors import ConfigError
from sftjax.models.moe_ops import (
    MoEConfig,
    Routing,
    combine,
    expert_count,
    grouped_ffn,
    inverse_permutation,
    ragged_matmul,
    routed_local,
    sort_by_expert,
    weight_logical_axes,
)
from sftjax.sharding import LOGICAL_RULES

EXPERT_MESH_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
EXPERT_RULES: dict[str, str | None] = {**LOGICAL_RULES, "expert": EXPERT_MESH_AXIS}  # = LOGICAL_RULES now


def expert_parallel_size(mesh, num_experts: int) -> int:
    """How many ways the experts are split on ``mesh`` (the ``fsdp`` size); one-line ConfigError when that axis
    does not divide the expert count."""
    ep = int(mesh.shape.get(EXPERT_MESH_AXIS, 1)) if mesh is not None else 1
    if ep > 1 and num_experts % ep:
        raise ConfigError(f"model.moe.num_experts={num_experts} is not divisible by the expert-parallel mesh axis "
                          f"{EXPERT_MESH_AXIS}={ep}; choose train.mesh.{EXPERT_MESH_AXIS} dividing {num_experts}")
    return ep


def check_expert_mesh(config: MoEConfig, mesh) -> None:
    """Fail before any compile when ``mesh`` cannot split ``config``'s experts (call it where the mesh is built)."""
    expert_parallel_size(mesh, config.num_experts)


def routed_experts(x_TD, routing: Routing, valid_T, weights: dict, config: MoEConfig, implementation: str):
    """The routed-expert output [T, D]: on one device directly, on a mesh per device under shard_map."""
    arrays = [v for v in weights.values() if hasattr(v, "shape")]
    mesh = find_mesh(x_TD, *arrays)
    if mesh is None:
        return routed_local(x_TD, routing, valid_T, weights, config, implementation)
    return _routed_on_mesh(mesh, x_TD, routing, valid_T, weights, config, implementation)


def _weight_spec(name: str, shape, ep_axis, tensor_axes) -> PartitionSpec:
    entries = []
    for logical, size in zip(weight_logical_axes(name, len(shape)), shape):
        if logical == "expert" and ep_axis is not None:
            entries.append(ep_axis)
        elif logical == "mlp" and tensor_axes:
            entries.append(spec_entry(tensor_axes))
        else:
            entries.append(None)
    return PartitionSpec(*entries)


def _routed_on_mesh(mesh, x_TD, routing: Routing, valid_T, weights: dict, config: MoEConfig,
                    implementation: str):
    ep = expert_parallel_size(mesh, config.num_experts)
    ep_axis = EXPERT_MESH_AXIS if ep > 1 else None
    tokens = x_TD.shape[0]
    row_axes = split_axes(mesh, tokens, ROW_AXES)
    quantized = any(isinstance(name, str) and name.endswith("_quant") for name in weights)
    # quantized experts stay whole per rank (their blocks and double-quantization scales run over each expert's
    # flattened [out, in]); only their expert axis is split
    tensor_axes = None if quantized else split_axes(mesh, config.expert_intermediate_size, (TENSOR_AXIS,))
    arrays = {name: value for name, value in weights.items() if hasattr(value, "shape")}
    statics = {name: value for name, value in weights.items() if not hasattr(value, "shape")}
    rows = spec_entry(row_axes)
    weight_specs = {name: _weight_spec(name, value.shape, ep_axis, tensor_axes) for name, value in arrays.items()}

    def reduce(value):
        return jax.lax.psum(value, tensor_axes) if tensor_axes else value

    def body(x, experts, routing_weights, valid, local_arrays):
        local = {**local_arrays, **statics}
        local_routing = Routing(None, routing_weights, experts)
        if ep == 1:
            return routed_local(x, local_routing, valid, local, config, implementation, reduce)
        return _routed_all_to_all(x, local_routing, valid, local, config, implementation, reduce, ep_axis, ep)

    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(PartitionSpec(rows, None), PartitionSpec(rows, None), PartitionSpec(rows, None),
                  PartitionSpec(rows), weight_specs),
        out_specs=PartitionSpec(rows, None), check_vma=False,
    )(x_TD, routing.experts_TK, routing.weights_TK, valid_T, arrays)


def _routed_all_to_all(x_TD, routing: Routing, valid_T, weights: dict, config: MoEConfig, implementation: str,
                       reduce, ep_axis: str, ep: int):
    """One device's share of expert parallelism (see the module docstring, steps 1-3)."""
    tokens, k = routing.experts_TK.shape
    dim = x_TD.shape[-1]
    local_experts = expert_count(weights)
    capacity = tokens * min(k, local_experts)

    # 1. pairs sorted by global expert; pairs for device d are the contiguous run [starts[d], starts[d] + counts[d])
    order, sorted_ids, _ = sort_by_expert(routing.experts_TK, valid_T, local_experts * ep)
    dest = sorted_ids // local_experts  # padding pairs: ep (no device)
    counts = jnp.zeros((ep,), jnp.int32).at[dest].add(1, mode="drop")
    starts = jnp.cumsum(counts) - counts
    # 2. the send buffer [ep, C] of pair indices, filled by a gather (no scatter)
    column = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    filled = column < counts[:, None]
    source = jnp.where(filled, starts[:, None] + column, 0)  # [ep, C] index into the sorted pairs
    send_x = jnp.take(x_TD, jnp.take(order // k, source.reshape(-1)), axis=0).reshape(ep, capacity, dim)
    send_x = jnp.where(filled[..., None], send_x, 0)
    device_base = (jnp.arange(ep, dtype=jnp.int32) * local_experts)[:, None]
    send_ids = jnp.where(filled, jnp.take(sorted_ids, source) - device_base, local_experts)

    # 3. exchange, compute the local experts on everything received, send the results back
    recv_x = jax.lax.all_to_all(send_x, ep_axis, 0, 0, tiled=True).reshape(ep * capacity, dim)
    recv_ids = jax.lax.all_to_all(send_ids, ep_axis, 0, 0, tiled=True).reshape(ep * capacity)
    recv_order = jnp.argsort(recv_ids, stable=True)
    recv_sorted_ids = jnp.take(recv_ids, recv_order)
    group_sizes = jnp.zeros((local_experts,), jnp.int32).at[recv_sorted_ids].add(1, mode="drop")
    y_sorted = grouped_ffn(jnp.take(recv_x, recv_order, axis=0), recv_sorted_ids, group_sizes, weights, config,
                           ragged_matmul(implementation), reduce)
    y_recv = jnp.take(y_sorted, inverse_permutation(recv_order), axis=0).reshape(ep, capacity, dim)
    back = jax.lax.all_to_all(y_recv, ep_axis, 0, 0, tiled=True).reshape(ep * capacity, dim)

    # each of my sorted pairs finds its result at (dest, slot) of what came back
    routed = dest < ep
    slot = jnp.arange(order.shape[0], dtype=jnp.int32) - jnp.take(starts, jnp.minimum(dest, ep - 1))
    y_pairs_sorted = jnp.take(back, jnp.where(routed, dest * capacity + slot, 0), axis=0)
    y_pairs = jnp.take(y_pairs_sorted, inverse_permutation(order), axis=0).reshape(tokens, k, dim)
    return combine(y_pairs, routing.weights_TK, jnp.broadcast_to(valid_T[:, None], (tokens, k)))
