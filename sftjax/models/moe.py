"""Mixture-of-experts feed-forward block: a router picks ``k`` of ``E`` experts per token, the chosen experts'
gated MLPs run on that token, and their outputs are summed with the routing weights.

Design, in plain words:

* **Router.** Logits ``x @ W_router (+ b)`` [T, E] in float32, then one of two orders: ``softmax_topk`` (softmax
  over all experts, keep the k largest, optionally renormalize them to sum to 1: Mixtral, Qwen2/3-MoE) or
  ``topk_softmax`` (keep the k largest logits, softmax over those: gpt-oss). Both pick the same experts; they
  differ in the weights.
* **Experts stored stacked.** Each projection is one ``[expert, in, out]`` parameter (logical axes
  ``("expert", "embed", "mlp")`` / ``("expert", "mlp", "embed")``), with optional ``[expert, out]`` biases and
  optional per-expert LoRA factors ``lora_a [expert, r, in]``, ``lora_b [expert, r, out]`` (r is never the
  minor axis, and A's gradient is built in that layout too: a TPU pads the minor axis to 128 lanes, which made
  every scanned layer's r=16 A gradient 8x its size).
* **Dropless grouped matmul.** The T*k (token, slot) pairs are sorted by expert, gathered into one [T*k, D]
  matrix whose rows come in runs of one expert each, and pushed through ``jax.lax.ragged_dot`` with the run
  lengths as group sizes (or megablox's ``gmm`` on TPU); the results are un-sorted, weighted and summed per
  token. No token is ever dropped and no capacity factor exists. ``implementation="dense"`` instead runs every
  token through every expert with an einsum and weights unchosen experts by zero: the oracle of the tests.
* **Gemma 4's block** (``branch_norms``, ``router_input_scale``, ``per_expert_scale``): the layer's dense MLP is
  the shared expert, and the block takes the un-normed residual r: ``experts_out_norm(experts(experts_norm(r)))
  + shared_expert_out_norm(shared(shared_expert_norm(r)))``, routed by ``rms_norm(r) * scale * D**-0.5`` (no
  norm weight), the renormalized top-k weights multiplied by a learned scale per expert.
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

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sftjax.errors import ConfigError
from sftjax.models.layers import Linear, RMSNorm, param, rms_normalize
from sftjax.models.moe_ops import (  # noqa: F401  (re-exported: the block's public names)
    _GLU_ACTIVATIONS,
    EXPERT_ACTIVATIONS,
    IMPLEMENTATIONS,
    MEGABLOX_ON_TPU,
    ROUTER_ORDERS,
    MoEAux,
    MoEConfig,
    Routing,
    combine,
    expert_activation,
    grouped_ffn,
    inverse_permutation,
    ragged_matmul,
    resolve_implementation,
    route,
    routed_dense,
    routed_local,
    router_statistics,
    sort_by_expert,
    weight_logical_axes,
)
from sftjax.models.moe_sharding import routed_experts
from sftjax.models.quant import QuantizedExpertWeight, quantize_expert_kernel
from sftjax.sharding import gather_for_compute

# ---------------------------------------------------------------------------------------------- modules


class Router(nnx.Module):
    """Router logits in float32: x @ kernel [embed, expert] (+ bias [expert]). Gemma 4's router
    (``input_scale``) first RMS-normalizes x without a weight and multiplies it by a learned ``scale`` [embed] and
    by hidden_size ** -0.5, and keeps a learned ``per_expert_scale`` [expert] for the chosen weights."""

    def __init__(self, hidden_size: int, num_experts: int, *, use_bias: bool, param_dtype, rngs: nnx.Rngs,
                 input_scale: bool = False, per_expert_scale: bool = False, eps: float = 1e-6):
        init = jax.nn.initializers.normal(stddev=0.02)
        self.kernel = param(init(rngs.params(), (hidden_size, num_experts), param_dtype), ("embed", "expert"))
        self.bias = param(jnp.zeros((num_experts,), param_dtype), ("expert",)) if use_bias else None
        self.scale = param(jnp.ones((hidden_size,), param_dtype), ("norm",)) if input_scale else None
        self.per_expert_scale = (param(jnp.ones((num_experts,), param_dtype), ("expert",)) if per_expert_scale
                                 else None)
        self.eps = eps
        self.root_size = float(hidden_size) ** -0.5

    def expert_scale(self):
        """[expert] scales of the chosen weights, or None."""
        if self.per_expert_scale is None:
            return None
        return gather_for_compute(self.per_expert_scale[...], ("expert",))

    def __call__(self, x_TD):
        kernel = gather_for_compute(self.kernel[...], ("embed", "expert")).astype(jnp.float32)
        x_TD = x_TD.astype(jnp.float32)
        if self.scale is not None:
            scale = gather_for_compute(self.scale[...], ("norm",)).astype(jnp.float32)
            x_TD = rms_normalize(x_TD, self.eps) * scale * self.root_size
        logits = jnp.dot(x_TD, kernel)
        if self.bias is not None:
            logits = logits + gather_for_compute(self.bias[...], ("expert",)).astype(jnp.float32)
        return logits


class ExpertLinear(nnx.Module):
    """One projection of every expert: kernel [expert, in, out] (+ bias [expert, out]) (+ per-expert LoRA
    ``lora_a [expert, r, in]``, ``lora_b [expert, r, out]``, scale alpha/r or alpha/sqrt(r)). The matmul itself is
    done by :func:`grouped_ffn` on the stacked arrays (``MoE.expert_weights``). After ``quantize`` the kernel is a
    frozen :class:`~sftjax.models.quant.QuantizedExpertWeight` (QLoRA on experts), dequantized inside the grouped
    matmul."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, use_bias: bool,
                 logical_axes: tuple[str, str, str], param_dtype, rngs: nnx.Rngs):
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.logical_axes = tuple(logical_axes)
        init = jax.nn.initializers.normal(stddev=0.02)
        # an nnx.Param [expert, in, out], or a QuantizedExpertWeight (frozen codes + scales) once ``quantize`` ran
        self.kernel = param(init(rngs.params(), (num_experts, in_features, out_features), param_dtype),
                            self.logical_axes)
        self.bias = (param(jnp.zeros((num_experts, out_features), param_dtype),
                           (self.logical_axes[0], self.logical_axes[2])) if use_bias else None)
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale: float = 0.0

    @property
    def quantized(self) -> bool:
        return isinstance(self.kernel, QuantizedExpertWeight)

    @property
    def kernel_dtype(self):
        return jnp.dtype(self.kernel.source_dtype) if self.quantized else self.kernel[...].dtype

    @property
    def kernel_shape(self) -> tuple[int, int, int]:
        return self.num_experts, self.in_features, self.out_features

    def quantize(self, fmt: str, *, double_quant: bool = False) -> None:
        """Replace the stacked kernel by its ``fmt`` (nf4 | int8) quantization, one bitsandbytes tensor per
        expert (see :class:`~sftjax.models.quant.QuantizedExpertWeight`)."""
        self.kernel = quantize_expert_kernel(self.kernel[...], fmt, expert_axis=self.logical_axes[0],
                                             double_quant=double_quant)

    def base_kernel(self):
        """The frozen kernel [expert, in, out] as stored, or dequantized (float32) when quantized."""
        if self.quantized:
            return jnp.swapaxes(self.kernel.dequantize(), 1, 2)
        return self.kernel[...]

    def enable_lora(self, rank: int, alpha: float, *, rslora: bool = False, dropout: float = 0.0,
                    rngs: nnx.Rngs, dtype=None) -> None:
        """Per-expert PEFT-style adapters: each A_e ~ U(+-1/sqrt(in)), each B_e = 0."""
        if dropout > 0:
            raise ConfigError(f"lora.dropout={dropout} is not supported on expert weights (nor by PEFT's "
                              "target_parameters); use 0, or leave the experts out of lora.target_modules")
        dtype = dtype or self.kernel_dtype
        experts = self.num_experts
        bound = 1.0 / math.sqrt(self.in_features)
        a = jax.random.uniform(rngs.params(), (experts, rank, self.in_features), jnp.float32, -bound, bound)
        expert_axis, in_axis, out_axis = self.logical_axes
        self.lora_a = nnx.LoRAParam(a.astype(dtype), logical_axes=(expert_axis, None, in_axis))
        self.lora_b = nnx.LoRAParam(jnp.zeros((experts, rank, self.out_features), dtype),
                                    logical_axes=(expert_axis, None, out_axis))
        self.lora_scale = float(alpha / math.sqrt(rank) if rslora else alpha / rank)

    def merged_kernel(self):
        """kernel + scale * A_e @ B_e per expert, in the kernel's dtype (float32 for a quantized kernel, which is
        dequantized; the kernel itself when there is no adapter)."""
        kernel = self.base_kernel()
        if self.lora_a is None:
            return kernel
        delta = jnp.einsum("eri,ero->eio", self.lora_a[...].astype(jnp.float32),
                           self.lora_b[...].astype(jnp.float32)) * self.lora_scale
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)

    def fold_adapter(self) -> bool:
        """Fold the adapter into a dense kernel in place and drop it; a quantized kernel becomes a dense
        ``nnx.Param`` in the dtype it was quantized from. Returns whether there was an adapter."""
        if self.lora_a is None:
            return False
        merged = self.merged_kernel()
        if self.quantized:
            self.kernel = param(merged.astype(self.kernel_dtype), self.logical_axes)
        else:
            self.kernel[...] = merged
        self.lora_a = self.lora_b = None
        return True

    def arrays(self, name: str) -> dict:
        """``{name}_kernel`` (or, quantized, ``{name}_quant_<array>`` and the static ``{name}_quant`` layout),
        ``{name}_bias``, ``{name}_lora_a/_lora_b/_lora_scale``: what :func:`grouped_ffn` takes."""
        if self.quantized:
            out = {f"{name}_quant_{key}": value for key, value in self.kernel.stored().items()}
            out[f"{name}_quant"] = self.kernel.layout
        else:
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
        self.router = Router(c.hidden_size, c.num_experts, use_bias=c.router_bias, param_dtype=pd, rngs=rngs,
                             input_scale=c.router_input_scale, per_expert_scale=c.per_expert_scale, eps=c.norm_eps)
        self.experts = Experts(c, param_dtype=pd, rngs=rngs)
        self.shared_expert = (SharedExpert(c, param_dtype=pd, rngs=rngs) if c.shared_expert_intermediate_size
                              else None)
        self.shared_expert_gate = (Linear(c.hidden_size, 1, logical_axes=("embed", None), param_dtype=pd,
                                          rngs=rngs) if c.shared_expert_gate else None)
        # Gemma 4: the input and output norms of the two branches (the block then takes the un-normed residual)
        for name in ("shared_expert_norm", "shared_expert_out_norm", "experts_norm", "experts_out_norm"):
            setattr(self, name, RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pd) if c.branch_norms else None)

    def expert_weights(self) -> dict:
        """The stacked expert arrays (and LoRA factors and scales) that the grouped matmuls take."""
        out = {}
        for name in ("gate", "up", "down"):
            out.update(getattr(self.experts, f"{name}_proj").arrays(name))
        return out

    def route(self, x_TD) -> Routing:
        return route(self.router(x_TD), self.config, x_TD.dtype, self.router.expert_scale())

    def __call__(self, x_BLD, segment_ids_BL=None, *, deterministic: bool = True):
        batch, length, dim = x_BLD.shape
        x_TD = x_BLD.reshape(batch * length, dim)
        if segment_ids_BL is None:
            valid_T = jnp.ones((batch * length,), bool)
        else:
            valid_T = segment_ids_BL.reshape(-1) != 0
        routing = self.route(x_TD)
        aux = router_statistics(routing, valid_T)
        x_shared_TD = x_TD
        if self.config.branch_norms:
            x_shared_TD, x_TD = self.shared_expert_norm(x_TD), self.experts_norm(x_TD)
        implementation = resolve_implementation(self.config.implementation)
        weights = self.expert_weights()
        if implementation == "dense":
            weights = {name: (gather_for_compute(value, weight_logical_axes(name, value.ndim))
                              if hasattr(value, "shape") else value) for name, value in weights.items()}
            y_TD = routed_dense(x_TD, routing, valid_T, weights, self.config)
        else:
            y_TD = routed_experts(x_TD, routing, valid_T, weights, self.config, implementation)
        if self.config.branch_norms:
            y_TD = self.experts_out_norm(y_TD.astype(x_BLD.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x_shared_TD, deterministic=deterministic)
            if self.shared_expert_gate is not None:
                gate = self.shared_expert_gate(x_shared_TD, deterministic=deterministic)
                shared = jax.nn.sigmoid(gate) * shared
            if self.config.branch_norms:
                shared = self.shared_expert_out_norm(shared)
            y_TD = y_TD + shared.astype(y_TD.dtype)
        return y_TD.reshape(batch, length, dim).astype(x_BLD.dtype), aux
