"""The functional core of the mixture-of-experts block: routing, router statistics, the grouped expert FFN
and its dense oracle, on one device. The nnx modules and the design notes are in :mod:`sftjax.models.moe`; the
expert-parallel dispatch over a mesh is in :mod:`sftjax.models.moe_sharding`; both build on this module."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from sftjax.models.moe_config import (  # noqa: F401  (re-exported)
    EXPERT_ACTIVATIONS,
    IMPLEMENTATIONS,
    MEGABLOX_ON_TPU,
    ROUTER_ORDERS,
    MoEConfig,
)

_GLU_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def resolve_implementation(name: str, backend: str | None = None) -> str:
    """The grouped-matmul implementation to use: ``auto`` is megablox on TPU (see MEGABLOX_ON_TPU), else
    ragged_dot."""
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    return "megablox" if backend == "tpu" and MEGABLOX_ON_TPU else "ragged_dot"


# ----------------------------------------------------------------------------------------------- statistics


@struct.dataclass
class MoEAux:
    """Additive router statistics of one forward (one MoE layer, or several summed: ``a + b``, or ``total``
    over a stacked leading axis). Padding tokens (``segment_ids == 0``) are excluded from all of them."""

    rows: jax.Array  # [] float32: tokens routed, summed over the layers counted here
    layers: jax.Array  # [] float32: MoE layers counted here
    expert_counts: jax.Array  # [E] float32: (token, slot) assignments per expert (also for logging)
    router_prob_sum: jax.Array  # [E] float32: sum over tokens of the router's softmax probabilities
    z_sum: jax.Array  # [] float32: sum over tokens of logsumexp(router logits)^2

    def __add__(self, other: MoEAux) -> MoEAux:
        return jax.tree.map(jnp.add, self, other)

    @classmethod
    def zeros(cls, num_experts: int) -> MoEAux:
        """The aux of a dense layer (counts nothing), so dense and MoE layers return the same structure."""
        zero = jnp.zeros((), jnp.float32)
        return cls(rows=zero, layers=zero, expert_counts=jnp.zeros((num_experts,), jnp.float32),
                   router_prob_sum=jnp.zeros((num_experts,), jnp.float32), z_sum=zero)

    @classmethod
    def total(cls, stacked: MoEAux) -> MoEAux:
        """The sum over a leading layer axis (the aux of scanned layers)."""
        return jax.tree.map(lambda a: jnp.sum(a, axis=0), stacked)

    @property
    def token_count(self) -> jax.Array:
        """Non-padding tokens of the forward (N)."""
        return self.rows / jnp.maximum(self.layers, 1.0)

    def load_balancing(self) -> tuple[jax.Array, jax.Array]:
        """(sum, count) of transformers' load-balancing loss; sum / count is its per-forward value."""
        rows = jnp.maximum(self.rows, 1.0)
        num_experts = self.expert_counts.shape[-1]
        value = num_experts * jnp.sum((self.expert_counts / rows) * (self.router_prob_sum / rows))
        return value * self.token_count, self.token_count

    def z_loss(self) -> tuple[jax.Array, jax.Array]:
        """(sum, count) of the router z-loss; sum / count is the mean over tokens and layers of lse^2."""
        return self.z_sum / jnp.maximum(self.layers, 1.0), self.token_count


class Routing(NamedTuple):
    logits_TE: jax.Array  # float32 router logits (bias included)
    weights_TK: jax.Array  # routing weights of the chosen experts, in the activation dtype
    experts_TK: jax.Array  # int32 chosen experts, distinct per token


def route(logits_TE, config: MoEConfig, dtype, expert_scale_E=None) -> Routing:
    """Top-k routing of float32 logits in the configured order; ``expert_scale_E`` (Gemma 4's per-expert scale)
    multiplies each chosen weight by its expert's scale."""
    k = config.num_experts_per_tok
    if config.router_order == "softmax_topk":
        probs = jax.nn.softmax(logits_TE, axis=-1)
        top, experts = jax.lax.top_k(probs, k)
        if config.norm_topk_prob:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
    else:
        top_logits, experts = jax.lax.top_k(logits_TE, k)
        top = jax.nn.softmax(top_logits, axis=-1)
    if expert_scale_E is not None:
        top = top * jnp.take(expert_scale_E.astype(jnp.float32), experts)
    return Routing(logits_TE, top.astype(dtype), experts.astype(jnp.int32))


def router_statistics(routing: Routing, valid_T) -> MoEAux:
    """This layer's MoEAux: counts from the chosen experts (no gradient), probabilities and z from the logits."""
    num_experts = routing.logits_TE.shape[-1]
    mask = valid_T.astype(jnp.float32)
    probs = jax.nn.softmax(routing.logits_TE, axis=-1)
    chosen = jax.nn.one_hot(routing.experts_TK, num_experts, dtype=jnp.float32).sum(axis=1)  # [T, E]
    lse = jax.nn.logsumexp(routing.logits_TE, axis=-1)
    return MoEAux(rows=jnp.sum(mask), layers=jnp.ones((), jnp.float32),
                  expert_counts=jax.lax.stop_gradient(jnp.einsum("te,t->e", chosen, mask)),
                  router_prob_sum=jnp.einsum("te,t->e", probs, mask),
                  z_sum=jnp.sum(jnp.square(lse) * mask))


# ------------------------------------------------------------------------------------------- expert math


def expert_activation(gate, up, config: MoEConfig):
    """act(gate) * up, or gpt-oss's clamped SwiGLU: (clip(up, -l, l) + 1) * g * sigmoid(alpha * g), g = min(gate, l)."""
    if config.activation == "clamped_swiglu":
        limit = config.swiglu_limit
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1.0) * (gate * jax.nn.sigmoid(gate * config.swiglu_alpha))
    return _GLU_ACTIVATIONS[config.activation](gate) * up


def ragged_matmul(implementation: str) -> Callable:
    """``(x [P, in], w [G, in, out], group_sizes [G], valid_P) -> [P, out]``: rows in runs of one group each;
    with ``transpose_rhs=True`` w is stored [G, out, in] (the experts' LoRA A).

    Rows past ``sum(group_sizes)`` are not part of any group; their output is 0. For megablox those rows are
    also zeroed on the way in and out, because its kernel leaves them unwritten and its backward would return
    unwritten input-gradient rows there (a ``where`` stops both, a multiply would not stop a NaN).
    """
    if implementation == "ragged_dot":
        def matmul(x, w, group_sizes, valid, transpose_rhs=False):
            del valid
            w = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
            return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
        return matmul
    if implementation in ("megablox", "megablox_interpret"):
        from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

        run_interpreted = implementation == "megablox_interpret"

        def matmul(x, w, group_sizes, valid, transpose_rhs=False):
            rows, k = x.shape
            n = w.shape[1] if transpose_rhs else w.shape[-1]
            tm = _megablox_tiling(rows, k, n)[0]  # bf16 packs 16 rows a tile
            padded = -(-rows // tm) * tm
            xv = jnp.where(valid[:, None], x, 0).astype(x.dtype)
            mask = valid
            if padded != rows:
                xv = jnp.pad(xv, ((0, padded - rows), (0, 0)))
                mask = jnp.pad(valid, (0, padded - rows))
            if transpose_rhs:
                out = _gmm_rhs_transposed(xv, w.astype(x.dtype), group_sizes.astype(jnp.int32), run_interpreted)
            else:
                out = megablox.gmm(xv, w.astype(x.dtype), group_sizes.astype(jnp.int32), x.dtype, _megablox_tiling,
                                   None, None, False, run_interpreted)
            return jnp.where(mask[:, None], out, 0)[:rows]
        return matmul
    raise ValueError(f"no grouped matmul {implementation!r}")


def _megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """megablox's tiles for an (m, k, n) problem; passed as its lookup function, so that the backward pass's
    matmuls, whose k and n are the forward's n and k, get tiles of their own dimensions (a rank-16 tile on a
    2048-wide axis does not lower on a TPU)."""
    return (128 if m >= 128 else -(-m // 16) * 16), _lane_tile(k), _lane_tile(n)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_rhs_transposed(x_PK, w_GNK, group_sizes_G, interpret: bool):
    """``x @ w[g].T`` per group through megablox, for a ``w`` stored [G, N, K] with a small N (the experts' LoRA
    A, N = the rank). megablox's own VJP computes the weight gradient as [G, K, N] and transposes it, and on a
    TPU that leaves N on the 128-lane axis (8x the memory of an r=16 gradient, kept for every scanned layer);
    this VJP asks ``tgmm`` for [G, N, K] directly. Rows are already padded to the row tile."""
    from jax.experimental.pallas.ops.tpu.megablox.ops import backend

    return backend.gmm(x_PK, w_GNK, group_sizes_G, x_PK.dtype, _megablox_tiling, transpose_rhs=True,
                       interpret=interpret)


def _gmm_rhs_transposed_fwd(x_PK, w_GNK, group_sizes_G, interpret):
    return _gmm_rhs_transposed(x_PK, w_GNK, group_sizes_G, interpret), (x_PK, w_GNK, group_sizes_G)


def _gmm_rhs_transposed_bwd(interpret, residuals, g_PN):
    from jax.experimental.pallas.ops.tpu.megablox.ops import backend

    x_PK, w_GNK, group_sizes_G = residuals
    g_PN = g_PN.astype(x_PK.dtype)
    dx = backend.gmm(g_PN, w_GNK, group_sizes_G, x_PK.dtype, _megablox_tiling, interpret=interpret)
    dw = backend.tgmm(g_PN.swapaxes(0, 1), x_PK, group_sizes_G, jnp.float32, _megablox_tiling,
                      num_actual_groups=w_GNK.shape[0], interpret=interpret)
    return dx, dw.astype(w_GNK.dtype), None


_gmm_rhs_transposed.defvjp(_gmm_rhs_transposed_fwd, _gmm_rhs_transposed_bwd)


def _lane_tile(dim: int) -> int:
    """A k/n tile for megablox: 512/256/128 when they divide ``dim``, else the whole dimension (always legal)."""
    for tile in (512, 256, 128):
        if dim % tile == 0:
            return tile
    return dim


def grouped_ffn(x_PD, ids_P, group_sizes_G, weights: dict, config: MoEConfig, matmul: Callable,
                reduce: Callable = lambda v: v):
    """The expert MLP of rows sorted by (local) expert ``ids_P`` (``G`` = no group, rows at the end).

    ``weights`` holds ``{gate,up,down}_kernel`` [G, in, out] (or their quantized arrays, see
    :func:`quantized_grouped_matmul`), optional ``{gate,up,down}_bias`` [G, out] and
    ``{gate,up,down}_lora_a`` [G, r, in] / ``_lora_b`` [G, r, out] with ``{...}_lora_scale`` (a float).
    ``reduce`` sums the down projection over a split intermediate dimension (a tensor-axis psum under expert
    parallelism; identity otherwise).
    """
    num_groups = expert_count(weights)
    valid = ids_P < num_groups
    safe_ids = jnp.minimum(ids_P, num_groups - 1)

    def project(h, name, *, reduced: bool):
        layout = weights.get(f"{name}_quant")
        if layout is None:
            y = matmul(h, weights[f"{name}_kernel"], group_sizes_G, valid)
        else:
            y = quantized_grouped_matmul(h, quant_arrays(weights, name), group_sizes_G, valid, layout=layout,
                                         matmul=matmul)
        lora_a = weights.get(f"{name}_lora_a")
        if reduced:
            y = reduce(y)
        if lora_a is not None:
            low = matmul(h, lora_a, group_sizes_G, valid, transpose_rhs=True)  # A stored [G, r, in]
            if reduced:
                low = reduce(low)
            delta = matmul(low, weights[f"{name}_lora_b"], group_sizes_G, valid)
            y = y + delta * jnp.asarray(weights[f"{name}_lora_scale"], y.dtype)
        bias = weights.get(f"{name}_bias")
        if bias is not None:
            y = y + jnp.take(bias.astype(y.dtype), safe_ids, axis=0)
        return y

    gate = project(x_PD, "gate", reduced=False)
    up = project(x_PD, "up", reduced=False)
    return project(expert_activation(gate, up, config), "down", reduced=True)


def sort_by_expert(experts_TK, valid_T, num_groups: int):
    """Sort the T*k (token, slot) pairs by expert; padding pairs get id ``num_groups`` and sort last.
    Returns (order_P, sorted_ids_P, group_sizes_G)."""
    ids = jnp.where(valid_T[:, None], experts_TK, num_groups).reshape(-1)
    order = jnp.argsort(ids, stable=True)
    sorted_ids = ids[order]
    group_sizes = jnp.zeros((num_groups,), jnp.int32).at[sorted_ids].add(1, mode="drop")
    return order, sorted_ids, group_sizes


def inverse_permutation(order):
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def combine(y_pairs_TKD, weights_TK, valid_TK):
    """sum_k weight * expert output, with unrouted pairs contributing exactly 0."""
    y = jnp.where(valid_TK[..., None], y_pairs_TKD, 0)
    weights = jnp.where(valid_TK, weights_TK, 0).astype(y.dtype)
    return jnp.einsum("tkd,tk->td", y, weights)


def routed_local(x_TD, routing: Routing, valid_T, weights: dict, config: MoEConfig, implementation: str,
                 reduce: Callable = lambda v: v):
    """Routed-expert output [T, D] on one device (all experts local): sort, grouped matmul, un-sort, combine."""
    tokens, k = routing.experts_TK.shape
    num_experts = expert_count(weights)
    order, sorted_ids, group_sizes = sort_by_expert(routing.experts_TK, valid_T, num_experts)
    x_sorted = jnp.take(x_TD, order // k, axis=0)
    y_sorted = grouped_ffn(x_sorted, sorted_ids, group_sizes, weights, config, ragged_matmul(implementation),
                           reduce)
    y_pairs = jnp.take(y_sorted, inverse_permutation(order), axis=0).reshape(tokens, k, -1)
    return combine(y_pairs, routing.weights_TK, jnp.broadcast_to(valid_T[:, None], (tokens, k)))


def routed_dense(x_TD, routing: Routing, valid_T, weights: dict, config: MoEConfig):
    """The oracle: every token through every expert (LoRA merged into the kernels), weighted by the routing
    weights scattered to a dense [T, E] matrix (0 for unchosen experts and padding)."""
    def kernel(name):
        layout = weights.get(f"{name}_quant")
        if layout is None:
            w = weights[f"{name}_kernel"].astype(x_TD.dtype)
        else:
            w = jnp.swapaxes(layout.dequantize_stacked(quant_arrays(weights, name)), 1, 2).astype(x_TD.dtype)
        if weights.get(f"{name}_lora_a") is not None:
            delta = jnp.einsum("eri,ero->eio", weights[f"{name}_lora_a"].astype(jnp.float32),
                               weights[f"{name}_lora_b"].astype(jnp.float32))
            w = (w.astype(jnp.float32) + delta * weights[f"{name}_lora_scale"]).astype(x_TD.dtype)
        return w

    def bias(name):
        b = weights.get(f"{name}_bias")
        return 0 if b is None else b.astype(x_TD.dtype)[None]

    gate = jnp.einsum("td,edf->tef", x_TD, kernel("gate")) + bias("gate")
    up = jnp.einsum("td,edf->tef", x_TD, kernel("up")) + bias("up")
    y = jnp.einsum("tef,efd->ted", expert_activation(gate, up, config), kernel("down")) + bias("down")
    num_experts = expert_count(weights)
    dense_weights = jnp.einsum("tk,tke->te", routing.weights_TK,
                               jax.nn.one_hot(routing.experts_TK, num_experts, dtype=routing.weights_TK.dtype))
    dense_weights = jnp.where(valid_T[:, None], dense_weights, 0).astype(y.dtype)
    return jnp.einsum("ted,te->td", y, dense_weights)


def weight_logical_axes(name: str, ndim: int = 3) -> tuple[str | None, ...]:
    """Logical axes of an entry of ``MoE.expert_weights()`` (``gate_kernel``, ``down_lora_b``, ...); a quantized
    array (``up_quant_codes``, ndim given) splits only its expert axis."""
    proj, _, kind = name.partition("_")
    if kind.startswith("quant_"):
        return ("expert",) + (None,) * (ndim - 1)
    in_axis, out_axis = ("mlp", "embed") if proj == "down" else ("embed", "mlp")
    return {"kernel": ("expert", in_axis, out_axis), "bias": ("expert", out_axis),
            "lora_a": ("expert", None, in_axis), "lora_b": ("expert", None, out_axis)}[kind]


def expert_count(weights: dict) -> int:
    """The experts (local ones, under expert parallelism) that ``weights`` holds."""
    if "gate_kernel" in weights:
        return weights["gate_kernel"].shape[0]
    return weights["gate_quant_codes"].shape[0]


def quant_arrays(weights: dict, name: str) -> dict:
    """The stored quantized arrays of projection ``name`` (``{name}_quant_<array>`` -> ``<array>``)."""
    prefix = f"{name}_quant_"
    return {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}


def quantized_grouped_matmul(x_PI, arrays: dict, group_sizes_G, valid_P, *, layout, matmul: Callable):
    """``matmul`` of rows sorted by expert with stacked quantized experts (QLoRA on experts): each expert's
    ``[out, in]`` weight is dequantized from ``arrays`` (``layout``: a ``QuantLayout``) right before the grouped
    matmul, in float32 and then cast to the compute dtype.

    ``matmul`` takes the weights as stored (``transpose_rhs``), never transposed. As for a quantized ``Linear``
    (``QuantizedWeight.matmul``), the VJP is our own: the backward dequantizes again
    from the stored arrays (its input gradient is the grouped matmul of the output cotangent with the ``[out, in]``
    weights, no transpose needed) instead of autodiff keeping each layer's dense experts from the forward, and
    optimization barriers tie each dequantization to its own matmul, so one layer's dense experts live only while
    that matmul runs. The stored arrays get no gradient (the base is frozen).
    """
    def dense(arrays, dtype):
        return layout.dequantize_stacked(arrays).astype(dtype)  # [G, out, in]

    @jax.custom_vjp
    def dot(x, arrays, group_sizes, valid):
        x, arrays = jax.lax.optimization_barrier((x, arrays))
        # [G, out, in] as the rhs of a transposed matmul: a swapaxes here becomes, on a TPU, a relayout of every
        # layer's stored codes at program entry (XLA moves the transpose onto the loop-invariant codes)
        return matmul(x, dense(arrays, x.dtype), group_sizes, valid, transpose_rhs=True)

    def forward(x, arrays, group_sizes, valid):
        return dot(x, arrays, group_sizes, valid), (arrays, group_sizes, valid)

    def backward(residuals, g):
        arrays, group_sizes, valid = residuals
        g, arrays = jax.lax.optimization_barrier((g, arrays))
        return matmul(g, dense(arrays, g.dtype), group_sizes, valid), None, None, None

    dot.defvjp(forward, backward)
    return dot(x_PI, arrays, group_sizes_G, valid_P)
