"""Mixture-of-experts feed-forward block: a router picks ``k`` of ``E`` experts per token, the chosen experts'
gated MLPs run on that token, and their outputs are summed with the routing weights.

Design, in plain words:

* **Router.** Logits ``x @ W_router (+ b)`` [T, E] in float32, then one of two orders: ``softmax_topk`` (softmax
  over all experts, keep the k largest, optionally renormalize them to sum to 1: Mixtral, Qwen2/3-MoE) or
  ``topk_softmax`` (keep the k largest logits, softmax over those: gpt-oss). Both pick the same experts; they
  differ in the weights.
* **Experts stored stacked.** Each projection is one ``[expert, in, out]`` parameter (logical axes
  ``("expert", "embed", "mlp")`` / ``("expert", "mlp", "embed")``), with optional ``[expert, out]`` biases and
  optional per-expert LoRA factors ``lora_a [expert, in, r]``, ``lora_b [expert, r, out]``.
* **Dropless grouped matmul.** The T*k (token, slot) pairs are sorted by expert, gathered into one [T*k, D]
  matrix whose rows come in runs of one expert each, and pushed through ``jax.lax.ragged_dot`` with the run
  lengths as group sizes (or megablox's ``gmm`` on TPU); the results are un-sorted, weighted and summed per
  token. No token is ever dropped and no capacity factor exists. ``implementation="dense"`` instead runs every
  token through every expert with an einsum and weights unchosen experts by zero: the oracle of the tests.
* **Padding is not routed.** Tokens with ``segment_ids == 0`` go to no expert (their routed output is 0; a shared
  expert still sees them) and are left out of every router statistic, as transformers' ``attention_mask`` does
  in ``load_balancing_loss_func``.
* **Expert parallelism.** On a mesh the expert computation runs per device under ``jax.shard_map``, experts split
  over the ``fsdp`` axis and tokens exchanged with ``all_to_all``: see :mod:`sftjax.models.moe_sharding`.

Auxiliary losses (normalization rules): :class:`MoEAux` carries additive statistics of one forward (per layer,
or summed over layers), never ratios, so they can be summed over layers, micro-batches and devices first and
divided once. ``load_balancing()`` is transformers' ``load_balancing_loss_func`` of the whole forward
(``E * sum_e f_e * P_e``, f_e = tokens sent to expert e / tokens (the f_e sum to k), P_e = mean router probability
of e, both pooled over every MoE layer of the forward, padding excluded; gradient through P only) returned as
``(value * N, N)`` with N the forward's non-padding tokens; ``z_loss()`` is ST-MoE's router z-loss (mean over
tokens and MoE layers of ``logsumexp(logits)^2``) as ``(value * N, N)``. Summing those pairs over the
micro-batches and devices of an optimizer step and dividing once gives, for one micro-batch, exactly
transformers' per-forward value; for several it gives the token-weighted mean of the per-micro-batch values (the f_e * P_e product is a per-forward quantity,
as in transformers, and cannot be split further). A train step with gradient accumulation therefore adds
``coef * sum / N_step`` to its objective, N_step being the non-padding tokens of the whole step (known from the
batch before the first micro-batch), next to the cross-entropy's ``sum / trained_tokens_step``.

LoRA on experts: ``ExpertLinear.enable_lora`` adds ``lora_a``/``lora_b`` per expert; the grouped path runs them as
two more grouped matmuls of rank r (never merging a [E, in, out] delta), the dense oracle merges them. Adapter
dropout is refused on experts (PEFT's ``target_parameters`` refuses it too: dropout cannot be factored out of a
merged weight).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sftjax.errors import ConfigError
from sftjax.models.layers import Linear, param
from sftjax.sharding import gather_for_compute

ROUTER_ORDERS = ("softmax_topk", "topk_softmax")
EXPERT_ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "clamped_swiglu")
IMPLEMENTATIONS = ("auto", "ragged_dot", "dense", "megablox", "megablox_interpret")
# megablox's gmm compiles for TPU inside shard_map, forward and backward (scripts/check_moe_tpu_lowering.py,
# run against libtpu's compiler on a v5p topology); "auto" uses it there and ragged_dot everywhere else.
MEGABLOX_ON_TPU = True

_GLU_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The closed set of switches of one MoE block (hashable: it lives on the model as static data)."""

    hidden_size: int
    expert_intermediate_size: int  # HF: moe_intermediate_size (Qwen), intermediate_size (Mixtral, gpt-oss)
    num_experts: int  # HF: num_local_experts / num_experts
    num_experts_per_tok: int  # k
    router_order: str = "softmax_topk"  # or "topk_softmax" (gpt-oss)
    norm_topk_prob: bool = True  # softmax_topk only: renormalize the k chosen probabilities to sum to 1
    router_bias: bool = False  # gpt-oss
    activation: str = "silu"  # GLU act(gate) * up; "clamped_swiglu" is gpt-oss's (alpha, limit, (up + 1))
    expert_bias: bool = False  # biases on the expert projections (gpt-oss)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # sigmoid(x @ w_gate) scales the shared expert (Qwen2-MoE)
    router_aux_loss_coef: float = 0.0  # coefficient of the load-balancing loss in the training objective
    router_z_loss_coef: float = 0.0  # coefficient of the router z-loss
    implementation: str = "auto"  # ragged_dot | dense (oracle) | megablox (TPU) | megablox_interpret (CPU) | auto

    def __post_init__(self):
        def bad(key, value, allowed):
            raise ConfigError(f"model.moe.{key}={value!r} is not supported (allowed: {allowed})")

        if self.router_order not in ROUTER_ORDERS:
            bad("router_order", self.router_order, ", ".join(ROUTER_ORDERS))
        if self.activation not in EXPERT_ACTIVATIONS:
            bad("activation", self.activation, ", ".join(EXPERT_ACTIVATIONS))
        if self.implementation not in IMPLEMENTATIONS:
            bad("implementation", self.implementation, ", ".join(IMPLEMENTATIONS))
        for key in ("hidden_size", "expert_intermediate_size", "num_experts", "num_experts_per_tok"):
            if int(getattr(self, key)) < 1:
                bad(key, getattr(self, key), "a positive integer")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"model.moe.num_experts_per_tok={self.num_experts_per_tok} is larger than "
                              f"model.moe.num_experts={self.num_experts}")
        if self.shared_expert_intermediate_size < 0:
            bad("shared_expert_intermediate_size", self.shared_expert_intermediate_size, "0 (none) or positive")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ConfigError("model.moe.shared_expert_gate=True needs a shared expert "
                              "(model.moe.shared_expert_intermediate_size > 0)")
        if self.shared_expert_intermediate_size and self.activation == "clamped_swiglu":
            raise ConfigError("model.moe.activation=clamped_swiglu with a shared expert is not supported "
                              "(no family combines them)")
        if self.router_order == "topk_softmax" and self.norm_topk_prob:
            raise ConfigError("model.moe.norm_topk_prob=True has no meaning with router_order=topk_softmax "
                              "(the softmax over the chosen experts already sums to 1); set it to False")

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)


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


def route(logits_TE, config: MoEConfig, dtype) -> Routing:
    """Top-k routing of float32 logits in the configured order."""
    k = config.num_experts_per_tok
    if config.router_order == "softmax_topk":
        probs = jax.nn.softmax(logits_TE, axis=-1)
        top, experts = jax.lax.top_k(probs, k)
        if config.norm_topk_prob:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
    else:
        top_logits, experts = jax.lax.top_k(logits_TE, k)
        top = jax.nn.softmax(top_logits, axis=-1)
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
    """``(x [P, in], w [G, in, out], group_sizes [G], valid_P) -> [P, out]``: rows in runs of one group each.

    Rows past ``sum(group_sizes)`` are not part of any group; their output is 0. For megablox those rows are
    also zeroed on the way in and out, because its kernel leaves them unwritten and its backward would return
    unwritten input-gradient rows there (a ``where`` stops both, a multiply would not stop a NaN).
    """
    if implementation == "ragged_dot":
        def matmul(x, w, group_sizes, valid):
            del valid
            return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
        return matmul
    if implementation in ("megablox", "megablox_interpret"):
        from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

        run_interpreted = implementation == "megablox_interpret"

        def matmul(x, w, group_sizes, valid):
            rows, k = x.shape
            n = w.shape[-1]
            tm = 128 if rows >= 128 else -(-rows // 16) * 16  # bf16 packs 16 rows a tile
            padded = -(-rows // tm) * tm
            tiling = (tm, _lane_tile(k), _lane_tile(n))
            xv = jnp.where(valid[:, None], x, 0).astype(x.dtype)
            mask = valid
            if padded != rows:
                xv = jnp.pad(xv, ((0, padded - rows), (0, 0)))
                mask = jnp.pad(valid, (0, padded - rows))
            out = megablox.gmm(xv, w.astype(x.dtype), group_sizes.astype(jnp.int32), x.dtype, tiling, None, None,
                               False, run_interpreted)
            return jnp.where(mask[:, None], out, 0)[:rows]
        return matmul
    raise ValueError(f"no grouped matmul {implementation!r}")


def _lane_tile(dim: int) -> int:
    """A k/n tile for megablox: 512/256/128 when they divide ``dim``, else the whole dimension (always legal)."""
    for tile in (512, 256, 128):
        if dim % tile == 0:
            return tile
    return dim


def grouped_ffn(x_PD, ids_P, group_sizes_G, weights: dict, config: MoEConfig, matmul: Callable,
                reduce: Callable = lambda v: v):
    """The expert MLP of rows sorted by (local) expert ``ids_P`` (``G`` = no group, rows at the end).

    ``weights`` holds ``{gate,up,down}_kernel`` [G, in, out], optional ``{gate,up,down}_bias`` [G, out] and
    ``{gate,up,down}_lora_a/_lora_b`` with ``{...}_lora_scale`` (a float). ``reduce`` sums the down projection
    over a split intermediate dimension (a tensor-axis psum under expert parallelism; identity otherwise).
    """
    num_groups = weights["gate_kernel"].shape[0]
    valid = ids_P < num_groups
    safe_ids = jnp.minimum(ids_P, num_groups - 1)

    def project(h, name, *, reduced: bool):
        y = matmul(h, weights[f"{name}_kernel"], group_sizes_G, valid)
        lora_a = weights.get(f"{name}_lora_a")
        if reduced:
            y = reduce(y)
        if lora_a is not None:
            low = matmul(h, lora_a, group_sizes_G, valid)
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
    num_experts = weights["gate_kernel"].shape[0]
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
        w = weights[f"{name}_kernel"].astype(x_TD.dtype)
        if weights.get(f"{name}_lora_a") is not None:
            delta = jnp.einsum("eir,ero->eio", weights[f"{name}_lora_a"].astype(jnp.float32),
                               weights[f"{name}_lora_b"].astype(jnp.float32))
            w = (w.astype(jnp.float32) + delta * weights[f"{name}_lora_scale"]).astype(x_TD.dtype)
        return w

    def bias(name):
        b = weights.get(f"{name}_bias")
        return 0 if b is None else b.astype(x_TD.dtype)[None]

    gate = jnp.einsum("td,edf->tef", x_TD, kernel("gate")) + bias("gate")
    up = jnp.einsum("td,edf->tef", x_TD, kernel("up")) + bias("up")
    y = jnp.einsum("tef,efd->ted", expert_activation(gate, up, config), kernel("down")) + bias("down")
    num_experts = weights["gate_kernel"].shape[0]
    dense_weights = jnp.einsum("tk,tke->te", routing.weights_TK,
                               jax.nn.one_hot(routing.experts_TK, num_experts, dtype=routing.weights_TK.dtype))
    dense_weights = jnp.where(valid_T[:, None], dense_weights, 0).astype(y.dtype)
    return jnp.einsum("ted,te->td", y, dense_weights)


# ---------------------------------------------------------------------------------------------- modules


class Router(nnx.Module):
    """Router logits in float32: x @ kernel [embed, expert] (+ bias [expert])."""

    def __init__(self, hidden_size: int, num_experts: int, *, use_bias: bool, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=0.02)
        self.kernel = param(init(rngs.params(), (hidden_size, num_experts), param_dtype), ("embed", "expert"))
        self.bias = param(jnp.zeros((num_experts,), param_dtype), ("expert",)) if use_bias else None

    def __call__(self, x_TD):
        kernel = gather_for_compute(self.kernel[...], ("embed", "expert")).astype(jnp.float32)
        logits = jnp.dot(x_TD.astype(jnp.float32), kernel)
        if self.bias is not None:
            logits = logits + gather_for_compute(self.bias[...], ("expert",)).astype(jnp.float32)
        return logits


class ExpertLinear(nnx.Module):
    """One projection of every expert: kernel [expert, in, out] (+ bias [expert, out]) (+ per-expert LoRA
    ``lora_a [expert, in, r]``, ``lora_b [expert, r, out]``, scale alpha/r or alpha/sqrt(r)). The matmul itself is
    done by :func:`grouped_ffn` on the stacked arrays (``MoE.expert_weights``)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, use_bias: bool,
                 logical_axes: tuple[str, str, str], param_dtype, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.logical_axes = tuple(logical_axes)
        init = jax.nn.initializers.normal(stddev=0.02)
        self.kernel = param(init(rngs.params(), (num_experts, in_features, out_features), param_dtype),
                            self.logical_axes)
        self.bias = (param(jnp.zeros((num_experts, out_features), param_dtype),
                           (self.logical_axes[0], self.logical_axes[2])) if use_bias else None)
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale: float = 0.0

    def enable_lora(self, rank: int, alpha: float, *, rslora: bool = False, dropout: float = 0.0,
                    rngs: nnx.Rngs, dtype=None) -> None:
        """Per-expert PEFT-style adapters: each A_e ~ U(+-1/sqrt(in)), each B_e = 0."""
        if dropout > 0:
            raise ConfigError(f"lora.dropout={dropout} is not supported on expert weights (nor by PEFT's "
                              "target_parameters); use 0, or leave the experts out of lora.target_modules")
        dtype = dtype or self.kernel[...].dtype
        experts = self.kernel[...].shape[0]
        bound = 1.0 / math.sqrt(self.in_features)
        a = jax.random.uniform(rngs.params(), (experts, self.in_features, rank), jnp.float32, -bound, bound)
        expert_axis, in_axis, out_axis = self.logical_axes
        self.lora_a = nnx.LoRAParam(a.astype(dtype), logical_axes=(expert_axis, in_axis, None))
        self.lora_b = nnx.LoRAParam(jnp.zeros((experts, rank, self.out_features), dtype),
                                    logical_axes=(expert_axis, None, out_axis))
        self.lora_scale = float(alpha / math.sqrt(rank) if rslora else alpha / rank)

    def merged_kernel(self):
        """kernel + scale * A_e @ B_e per expert, in the kernel's dtype (the kernel when there is no adapter)."""
        kernel = self.kernel[...]
        if self.lora_a is None:
            return kernel
        delta = jnp.einsum("eir,ero->eio", self.lora_a[...].astype(jnp.float32),
                           self.lora_b[...].astype(jnp.float32)) * self.lora_scale
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)

    def arrays(self, name: str) -> dict:
        out = {f"{name}_kernel": self.kernel[...]}
        if self.bias is not None:
            out[f"{name}_bias"] = self.bias[...]
        if self.lora_a is not None:
            out.update({f"{name}_lora_a": self.lora_a[...], f"{name}_lora_b": self.lora_b[...],
                        f"{name}_lora_scale": self.lora_scale})
        return out


class Experts(nnx.Module):
    def __init__(self, config: MoEConfig, *, param_dtype, rngs: nnx.Rngs):
        c = config
        d, f, e = c.hidden_size, c.expert_intermediate_size, c.num_experts
        self.gate_proj = ExpertLinear(e, d, f, use_bias=c.expert_bias, logical_axes=("expert", "embed", "mlp"),
                                      param_dtype=param_dtype, rngs=rngs)
        self.up_proj = ExpertLinear(e, d, f, use_bias=c.expert_bias, logical_axes=("expert", "embed", "mlp"),
                                    param_dtype=param_dtype, rngs=rngs)
        self.down_proj = ExpertLinear(e, f, d, use_bias=c.expert_bias, logical_axes=("expert", "mlp", "embed"),
                                      param_dtype=param_dtype, rngs=rngs)


class SharedExpert(nnx.Module):
    """A dense gated MLP every token goes through (Qwen2-MoE's ``shared_expert``)."""

    def __init__(self, config: MoEConfig, *, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.shared_expert_intermediate_size
        self.activation = config.activation
        self.gate_proj = Linear(d, f, logical_axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.up_proj = Linear(d, f, logical_axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.down_proj = Linear(f, d, logical_axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, deterministic: bool = True):
        gate = _GLU_ACTIVATIONS[self.activation](self.gate_proj(x, deterministic=deterministic))
        return self.down_proj(gate * self.up_proj(x, deterministic=deterministic), deterministic=deterministic)


class MoE(nnx.Module):
    """The MoE feed-forward block: ``(x_BLD, segment_ids_BL) -> (y_BLD, MoEAux)``; see the module docstring."""

    def __init__(self, config: MoEConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = jnp.dtype(param_dtype)
        self.router = Router(c.hidden_size, c.num_experts, use_bias=c.router_bias, param_dtype=pd, rngs=rngs)
        self.experts = Experts(c, param_dtype=pd, rngs=rngs)
        self.shared_expert = (SharedExpert(c, param_dtype=pd, rngs=rngs) if c.shared_expert_intermediate_size
                              else None)
        self.shared_expert_gate = (Linear(c.hidden_size, 1, logical_axes=("embed", None), param_dtype=pd,
                                          rngs=rngs) if c.shared_expert_gate else None)

    def expert_weights(self) -> dict:
        """The stacked expert arrays (and LoRA factors and scales) that the grouped matmuls take."""
        out = {}
        for name in ("gate", "up", "down"):
            out.update(getattr(self.experts, f"{name}_proj").arrays(name))
        return out

    def route(self, x_TD) -> Routing:
        return route(self.router(x_TD), self.config, x_TD.dtype)

    def __call__(self, x_BLD, segment_ids_BL=None, *, deterministic: bool = True):
        batch, length, dim = x_BLD.shape
        x_TD = x_BLD.reshape(batch * length, dim)
        if segment_ids_BL is None:
            valid_T = jnp.ones((batch * length,), bool)
        else:
            valid_T = segment_ids_BL.reshape(-1) != 0
        routing = self.route(x_TD)
        aux = router_statistics(routing, valid_T)
        implementation = resolve_implementation(self.config.implementation)
        weights = self.expert_weights()
        if implementation == "dense":
            weights = {name: (gather_for_compute(value, weight_logical_axes(name)) if hasattr(value, "shape")
                              else value) for name, value in weights.items()}
            y_TD = routed_dense(x_TD, routing, valid_T, weights, self.config)
        else:
            from sftjax.models.moe_sharding import routed_experts

            y_TD = routed_experts(x_TD, routing, valid_T, weights, self.config, implementation)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_TD, deterministic=deterministic)
            if self.shared_expert_gate is not None:
                gate = self.shared_expert_gate(x_TD, deterministic=deterministic)
                shared = jax.nn.sigmoid(gate) * shared
            y_TD = y_TD + shared.astype(y_TD.dtype)
        return y_TD.reshape(batch, length, dim).astype(x_BLD.dtype), aux


def weight_logical_axes(name: str) -> tuple[str | None, ...]:
    """Logical axes of an entry of ``MoE.expert_weights()`` (``gate_kernel``, ``down_lora_b``, ...)."""
    proj, _, kind = name.partition("_")
    in_axis, out_axis = ("mlp", "embed") if proj == "down" else ("embed", "mlp")
    return {"kernel": ("expert", in_axis, out_axis), "bias": ("expert", out_axis),
            "lora_a": ("expert", in_axis, None), "lora_b": ("expert", None, out_axis)}[kind]

