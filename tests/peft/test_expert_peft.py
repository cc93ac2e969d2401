"""Per-expert LoRA adapters exported as a PEFT adapter (peft ``target_parameters`` on the fused expert
parameters of transformers) load in ``peft.PeftModel.from_pretrained`` onto the original checkpoint and give our
logits: Mixtral, gpt-oss (interleaved gate/up) and Gemma 4 (experts on the layer) with every expert projection
adapted, Qwen3-MoE with only some
of them (one wrapped parameter, no nesting; gate without up)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sftjax.config import LoraSection  # noqa: E402
from sftjax.models.loading import load_model  # noqa: E402
from sftjax.peft.adapter_io import write_peft_adapter  # noqa: E402
from sftjax.peft.lora import apply_lora, linear_modules  # noqa: E402
from tests.oracle import assert_close, relative_error  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64, num_experts_per_tok=2, tie_word_embeddings=False)
CASES = {
    "mixtral_all": ("MixtralConfig", dict(COMMON, intermediate_size=24, num_local_experts=4),
                    ["q_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt_oss_all": ("GptOssConfig", dict(COMMON, intermediate_size=16, num_local_experts=4,
                                         layer_types=["sliding_attention", "full_attention"], sliding_window=4),
                    ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen3_moe_down_only": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=40, moe_intermediate_size=16,
                                                   num_experts=4), ["down_proj"]),
    "qwen3_moe_all_linear": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=40, moe_intermediate_size=16,
                                                    num_experts=4), "all-linear"),
    # the router trained in full beside the adapters (lora.modules_to_save), exported whole as peft does
    "qwen3_moe_router_saved": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=40, moe_intermediate_size=16,
                                                      num_experts=4), "all-linear"),
    # the dense MLP (our shared expert) adapted as peft's mlp.*_proj, the experts as experts.gate_up_proj/down_proj
    "gemma4_moe_all": ("Gemma4TextConfig", dict(COMMON, intermediate_size=24, num_experts=4, top_k_experts=2,
                                                moe_intermediate_size=16, enable_moe_block=True, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention"],
                                                hidden_size_per_layer_input=0),
                       ["q_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen3_moe_gate_only": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=40, moe_intermediate_size=16,
                                                   num_experts=4), ["v_proj", "gate_proj"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_expert_adapters_load_in_peft_with_our_logits(case, rslora, tmp_path):
    config_class, kwargs, targets = CASES[case]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs),
                                                       attn_implementation="eager").float()
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            parameter.add_((0.5 if ("gate.weight" in name or "router" in name) else 0.05)
                           * torch.randn_like(parameter))
    hf.save_pretrained(tmp_path / "base")
    model, config = load_model(tmp_path / "base", dtype=jnp.float32)
    saved = ["router"] if case.endswith("router_saved") else []
    lora = LoraSection(enabled=True, r=2, alpha=6.0, rslora=rslora, target_modules=targets, modules_to_save=saved)
    apply_lora(model, lora, rngs=nnx.Rngs(1))
    if saved:  # as if trained: the routers move off the checkpoint's values
        for layer in model.layers:
            kernel = layer.mlp.router.kernel
            kernel[...] = kernel[...] + 0.5 * jax.random.normal(jax.random.key(7), kernel[...].shape)
    key = jax.random.key(3)
    for module in linear_modules(model).values():  # trained-looking adapters (a fresh B is zero)
        if getattr(module, "lora_b", None) is not None:
            key, sub = jax.random.split(key)
            module.lora_b[...] = 0.5 * jax.random.normal(sub, module.lora_b[...].shape)
    tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 12)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(tokens)))

    out = write_peft_adapter(model, config, tmp_path / "adapter", lora=vars(lora),
                             base_model_name_or_path=str(tmp_path / "base"))
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_parameters"], written
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    with torch.no_grad():
        plain = base(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()
        via_peft = peft.PeftModel.from_pretrained(base, out).eval()(
            torch.tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()
    assert relative_error(via_peft, plain) > 1e-2  # the adapters change the output
    assert_close(via_peft, ours, 1e-5, what=f"{case}: peft logits")
