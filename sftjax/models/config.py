"""ModelConfig: the closed set of switches the generic decoder understands.

Every supported Hugging Face family is expressed as a value of this dataclass; the family files in
``sftjax/models/families`` translate ``config.json`` to and from it. The dataclass is frozen and holds only
hashable values (tuples, not lists or dicts) because it lives on the model as static graph data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sftjax.models.moe_config import MoEConfig

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "yarn", "proportional")
REMAT_POLICIES = ("none", "full", "save_dots", "offload_dots")
# MoEConfig fields a run sets (model.moe in the run config) and config.json does not hold
MOE_RUNTIME_FIELDS = ("router_z_loss_coef", "implementation")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (names follow HF where there is one)."""

    # identity
    architecture: str = "LlamaForCausalLM"
    family: str = "llama"
    # sizes
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    # rotary position embedding
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: int | None = None  # llama3 / longrope / yarn
    rope_short_factor: tuple[float, ...] | None = None  # longrope
    rope_long_factor: tuple[float, ...] | None = None  # longrope
    rope_attention_factor: float | None = None  # longrope / yarn (None = derived like transformers)
    rope_beta_fast: float = 32.0  # yarn: rotations below which a frequency is interpolated fully
    rope_beta_slow: float = 1.0  # yarn: rotations above which a frequency is kept (extrapolated)
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
    partial_rotary_factor: float = 1.0  # proportional: the share of each head's frequency pairs that rotate
    sliding_rope_theta: float | None = None  # sliding layers use default RoPE with this base (Gemma 3/4)
    # attention switches
    attention_bias: bool = False  # bias on q, k, v projections
    attention_out_bias: bool = False  # bias on o_proj
    attention_sinks: bool = False  # one learned sink logit per query head in every softmax (gpt-oss)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer FULL_ATTENTION / SLIDING_ATTENTION; None = all sliding
    attn_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 instead of head_dim ** -0.5
    global_head_dim: int | None = None  # head_dim of the full-attention layers when it differs (Gemma 4)
    global_num_kv_heads: int | None = None  # kv heads of the full-attention layers when they differ (Gemma 4)
    attention_k_eq_v: bool = False  # full-attention layers take the values from k_proj (no v_proj; Gemma 4)
    v_norm: bool = False  # values RMS-normalized (no weight) before attention (Gemma 4)
    # block switches
    mlp_bias: bool = False
    activation: str = "silu"
    sandwich_norms: bool = False  # extra norms on the attention and MLP outputs (Gemma2)
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w) (Gemma)
    embedding_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    layer_scalar: bool = False  # each layer's output times a stored, frozen scalar (Gemma 4)
    per_layer_input_size: int = 0  # per-layer embeddings of this width added into every layer (Gemma 4 E2B/E4B)
    per_layer_vocab_size: int | None = None  # their vocabulary (None = vocab_size)
    kv_shared_layers: int = 0  # the last N layers reuse the keys/values of the last earlier layer of their kind
    double_wide_shared_mlp: bool = False  # those layers' MLP is twice intermediate_size wide (Gemma 4)
    tie_word_embeddings: bool = False
    final_logit_softcap: float | None = None
    # mixture of experts: None = every layer has the dense MLP; else the MoE block of the layers is_moe_layer says
    moe: MoEConfig | None = None  # num_experts, num_experts_per_tok, expert_intermediate_size, router_order, ...
    mlp_only_layers: tuple[int, ...] = ()  # layers that keep the dense MLP (Qwen-MoE)
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 (Qwen-MoE; 1 = every layer)
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # numerics and memory
    dtype: str = "float32"  # activation dtype
    param_dtype: str = "float32"
    remat: str = "none"
    # config.json keys we do not model but keep for a faithful round trip (sorted (key, json-text) pairs)
    hf_extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if isinstance(self.moe, dict):  # model.init gives a mapping; the block's width is the model's
            object.__setattr__(self, "moe", MoEConfig(**{"hidden_size": self.hidden_size, **self.moe}))
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(f"moe must be a MoEConfig or a mapping of its fields, got {type(self.moe).__name__}")
            if self.moe.hidden_size != self.hidden_size:
                raise ValueError(f"moe.hidden_size {self.moe.hidden_size} differs from hidden_size {self.hidden_size}")
        if int(self.decoder_sparse_step) < 1:
            raise ValueError(f"decoder_sparse_step {self.decoder_sparse_step} must be an integer >= 1")
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad_layers:
            raise ValueError(f"mlp_only_layers {list(self.mlp_only_layers)} has layer {bad_layers[0]} outside "
                             f"0..{self.num_layers - 1}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {ACTIVATIONS}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} not in {ROPE_TYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} not in {REMAT_POLICIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        per_type = {"sliding_rope_theta": self.sliding_rope_theta, "global_head_dim": self.global_head_dim,
                    "global_num_kv_heads": self.global_num_kv_heads, "attention_k_eq_v": self.attention_k_eq_v or None}
        if self.sliding_window is None and any(v is not None for v in per_type.values()):
            name = next(k for k, v in per_type.items() if v is not None)
            raise ValueError(f"{name} sets full and sliding layers apart, so it needs sliding_window (and layer_types)")
        if not 0 <= self.kv_shared_layers < self.num_layers:
            raise ValueError(f"kv_shared_layers {self.kv_shared_layers} must leave at least one of the "
                             f"{self.num_layers} layers computing its own keys and values")
        if self.kv_shared_layers:
            first_shared = self.num_layers - self.kv_shared_layers
            kinds = {self.layer_type(j) for j in range(first_shared)}
            missing = sorted({self.layer_type(i) for i in range(first_shared, self.num_layers)} - kinds)
            if missing:
                raise ValueError(f"kv_shared_layers {self.kv_shared_layers}: no earlier {missing[0]} layer gives "
                                 "the shared layers of that kind their keys and values")
        if self.per_layer_input_size < 0:
            raise ValueError(f"per_layer_input_size {self.per_layer_input_size} must be >= 0")
        if self.global_num_kv_heads is not None and self.num_heads % self.global_num_kv_heads:
            raise ValueError(f"global_num_kv_heads {self.global_num_kv_heads} does not divide num_heads "
                             f"{self.num_heads}")

    def kv_source(self, layer_index: int) -> int | None:
        """The layer whose keys/values layer ``layer_index`` reuses (the last layer of its kind before the shared
        ones), or None for a layer that computes its own."""
        first_shared = self.num_layers - self.kv_shared_layers
        if layer_index < first_shared:
            return None
        kind = self.layer_type(layer_index)
        return max(j for j in range(first_shared) if self.layer_type(j) == kind)

    @property
    def kv_producers(self) -> frozenset[int]:
        """The layers whose keys/values later layers reuse."""
        return frozenset(self.kv_source(i) for i in range(self.num_layers - self.kv_shared_layers, self.num_layers))

    def mlp_width(self, layer_index: int) -> int:
        """The dense MLP's intermediate size in layer ``layer_index``."""
        wide = self.double_wide_shared_mlp and self.kv_source(layer_index) is not None
        return self.intermediate_size * (2 if wide else 1)

    def layer_type(self, layer_index: int) -> str:
        """FULL_ATTENTION or SLIDING_ATTENTION: the attention kind of one layer."""
        return FULL_ATTENTION if self.sliding_window_for_layer(layer_index) is None else SLIDING_ATTENTION

    @property
    def per_layer_type(self) -> bool:
        """Whether full and sliding layers differ in more than the window (RoPE or head shape; Gemma 3/4)."""
        return self.sliding_window is not None and (
            self.sliding_rope_theta is not None or self.global_head_dim is not None
            or self.global_num_kv_heads is not None or self.attention_k_eq_v)

    def for_layer_type(self, layer_type: str) -> "ModelConfig":
        """The config the attention of one kind of layer sees: its head shape and RoPE resolved."""
        if not self.per_layer_type:
            return self
        if layer_type == FULL_ATTENTION:
            return self.replace(head_dim=self.global_head_dim or self.head_dim,
                                num_kv_heads=self.global_num_kv_heads or self.num_kv_heads)
        if self.sliding_rope_theta is None:
            return self
        return self.replace(rope_theta=self.sliding_rope_theta, rope_type="default", rope_factor=1.0,
                            partial_rotary_factor=1.0, rope_short_factor=None, rope_long_factor=None,
                            rope_attention_factor=None)

    def sliding_window_for_layer(self, layer_index: int) -> int | None:
        """The window of one layer: None means full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer_index] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` has the MoE block (else the dense MLP of ``intermediate_size``)."""
        return (self.moe is not None and layer_index not in self.mlp_only_layers
                and (layer_index + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def attention_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(base) ** -0.5

    @property
    def rotary_dim(self) -> int:
        if self.rope_type == "proportional":  # the whole head, the frequencies past the factor's share are zero
            return self.head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict:
        """The ``config.json`` dict transformers reads for this architecture.

        Raises CheckpointError when the architecture cannot express a switch of this config (e.g. a sliding
        window on a Llama): reading the dict back must give the same model, or the export would silently differ.
        """
        from sftjax.errors import CheckpointError
        from sftjax.models.registry import family_for_config

        family = family_for_config(self)
        hf = family.config_to_hf(self)
        back = family.config_from_hf(hf, source=f"{self.architecture} config")
        runtime_only = {"hf_extra", "dtype", "param_dtype", "remat"}

        def saved(config, name):
            value = getattr(config, name)
            if name == "moe" and value is not None:  # the run-time switches of the block are not in config.json
                value = value.replace(**{key: getattr(MoEConfig, key) for key in MOE_RUNTIME_FIELDS})
            return value

        lost = [f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self)
                if field.name not in runtime_only and saved(back, field.name) != saved(self, field.name)]
        if lost:
            raise CheckpointError(f"model config: {self.architecture} checkpoints cannot express "
                                  f"{', '.join(lost)}; choose an architecture that has these switches")
        return hf
