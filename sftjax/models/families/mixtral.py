"""Mixtral: Mistral blocks whose MLP is a softmax-top-k (renormalized) mixture of experts on every layer."""

from __future__ import annotations

from sftjax.models.config import ModelConfig
from sftjax.models.families.common import base_config, base_config_to_hf, hf_config_object, llama_like_specs
from sftjax.models.families.moe_common import moe_fields, moe_layer_specs, moe_to_hf

MODEL_TYPE = "mixtral"
ARCHITECTURES = ("MixtralForCausalLM",)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    cfg = hf_config_object(hf, MODEL_TYPE, source)
    return base_config(hf, cfg, architecture=ARCHITECTURES[0], family=MODEL_TYPE, source=source,
                       sliding_window=cfg.sliding_window, layer_types=None, **moe_fields(cfg, MODEL_TYPE, source=source))


def config_to_hf(config: ModelConfig) -> dict:
    hf = base_config_to_hf(config, MODEL_TYPE)
    hf.update(sliding_window=config.sliding_window, num_local_experts=config.moe.num_experts,
              intermediate_size=config.moe.expert_intermediate_size, router_jitter_noise=0.0, **moe_to_hf(config))
    return hf


def weight_specs(config: ModelConfig):
    return llama_like_specs(config, moe_specs=lambda i: moe_layer_specs(config, i, block="block_sparse_moe",
                                                                         style="mixtral"))
