"""The switches of one mixture-of-experts block (:class:`MoEConfig`), free of jax so that the run configuration
and :class:`sftjax.models.config.ModelConfig` can hold one. The block itself is :mod:`sftjax.models.moe`."""

from __future__ import annotations

import dataclasses

from sftjax.errors import ConfigError

ROUTER_ORDERS = ("softmax_topk", "topk_softmax")
EXPERT_ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "clamped_swiglu")
IMPLEMENTATIONS = ("auto", "ragged_dot", "dense", "megablox", "megablox_interpret")
# megablox's gmm compiles for TPU inside shard_map, forward and backward (scripts/check_moe_tpu_lowering.py,
# run against libtpu's compiler on a v5p topology); "auto" uses it there and ragged_dot everywhere else.
MEGABLOX_ON_TPU = True


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
    # Gemma 4: the router reads rms_norm(x) * scale[D] * D**-0.5 (a weightless norm, a learned scale) ...
    router_input_scale: bool = False
    per_expert_scale: bool = False  # ... and each chosen weight is multiplied by a learned scale of its expert
    # Gemma 4: the block takes the un-normed residual; the shared expert (the layer's dense MLP) and the routed
    # experts each have an input and an output RMSNorm (plain weight), the router reads the residual itself
    branch_norms: bool = False
    norm_eps: float = 1e-6  # of the router's and the branches' RMSNorms
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
        if self.branch_norms and (not self.shared_expert_intermediate_size or self.shared_expert_gate):
            raise ConfigError("model.moe.branch_norms=True needs a shared expert without a gate "
                              "(model.moe.shared_expert_intermediate_size > 0, shared_expert_gate=False)")
        if self.shared_expert_intermediate_size and self.activation == "clamped_swiglu":
            raise ConfigError("model.moe.activation=clamped_swiglu with a shared expert is not supported "
                              "(no family combines them)")
        if self.router_order == "topk_softmax" and self.norm_topk_prob:
            raise ConfigError("model.moe.norm_topk_prob=True has no meaning with router_order=topk_softmax "
                              "(the softmax over the chosen experts already sums to 1); set it to False")

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)
