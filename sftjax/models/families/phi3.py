"""Phi-3: Llama blocks whose checkpoint fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``;
optional partial rotary, longrope scaling and a sliding window on every layer."""

from __future__ import annotations

from sftjax.models.config import ModelConfig
from sftjax.models.families.common import TensorSpec, base_config, base_config_to_hf, hf_config_object

MODEL_TYPE = "phi3"
ARCHITECTURES = ("Phi3ForCausalLM",)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    return base_config(hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source,
                       sliding_window=cfg.sliding_window, layer_types=None)


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf.update(sliding_window=config.sliding_window)
    if config.rope_original_max_position_embeddings:
        hf["original_max_position_embeddings"] = config.rope_original_max_position_embeddings
    return hf


def weight_specs(config: ModelConfig):
    q_dim, kv_dim, ffn = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, \
        config.intermediate_size
    specs = [TensorSpec("model.embed_tokens.weight", (("embed_tokens.embedding", None, None),), False),
             TensorSpec("model.norm.weight", (("norm.weight", None, None),), False)]
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (("lm_head.kernel", None, None),), True))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        specs += [
            TensorSpec(f"{hf}.self_attn.qkv_proj.weight", (
                (f"{ours}.attn.q_proj.kernel", 0, q_dim),
                (f"{ours}.attn.k_proj.kernel", q_dim, q_dim + kv_dim),
                (f"{ours}.attn.v_proj.kernel", q_dim + kv_dim, q_dim + 2 * kv_dim)), True),
            TensorSpec(f"{hf}.self_attn.o_proj.weight", ((f"{ours}.attn.o_proj.kernel", None, None),), True),
            TensorSpec(f"{hf}.mlp.gate_up_proj.weight", (
                (f"{ours}.mlp.gate_proj.kernel", 0, ffn),
                (f"{ours}.mlp.up_proj.kernel", ffn, 2 * ffn)), True),
            TensorSpec(f"{hf}.mlp.down_proj.weight", ((f"{ours}.mlp.down_proj.kernel", None, None),), True),
            TensorSpec(f"{hf}.input_layernorm.weight", ((f"{ours}.attn_norm.weight", None, None),), False),
            TensorSpec(f"{hf}.post_attention_layernorm.weight", ((f"{ours}.mlp_norm.weight", None, None),), False),
        ]
    return specs
