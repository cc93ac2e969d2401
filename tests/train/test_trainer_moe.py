"""The whole run on a tiny Qwen3-MoE (``model.init``, random weights) with LoRA on attention and on every expert:
``Trainer.fit`` trains it (the eval loss falls), logs the router losses and per-expert token counts, and the merged
model it saves loads in transformers with the trained model's logits."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")

import jax.numpy as jnp  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
EXPERTS = 4
MOE_INIT = [
    "model.init.architecture=Qwen3MoeForCausalLM", "model.init.family=qwen3_moe", "model.init.qk_norm=true",
    "model.init.tie_word_embeddings=false",
    f"model.init.moe={{num_experts: {EXPERTS}, num_experts_per_tok: 2, expert_intermediate_size: 32, "
    "router_aux_loss_coef: 0.01}",
    "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target_modules=all-linear",
    "optim.learning_rate=1.0e-2",
]


def test_moe_lora_run_trains_logs_router_metrics_and_exports(assets_dir, tmp_path):
    import sftjax

    overrides = [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
                 f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
                 f"train.output_dir={tmp_path}", "train.progress=false", "train.steps=12", "train.log_every=3",
                 "train.eval_every=12", *MOE_INIT]
    cfg = sftjax.load_config(REPO / "configs" / "tiny_cpu.yaml", overrides=overrides)
    trainer = sftjax.Trainer(cfg)
    before = trainer.evaluate()["loss"]
    after = trainer.fit()["eval"]["loss"]
    assert after < before - 0.05, (before, after)  # the same eval rows, before and after 12 LoRA steps
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    for record in train:
        assert np.isfinite(record["router_aux_loss"]) and record["router_aux_loss"] > 0
        counts = [record[f"expert_tokens_{e}"] for e in range(EXPERTS)]
        assert sum(counts) > 0 and all(c >= 0 for c in counts)

    trained = trainer.updated_model()
    tokens = np.random.default_rng(0).integers(3, 1000, (2, 16)).astype(np.int32)
    want = np.asarray(trained(jnp.asarray(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        got = hf(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(np.abs(want).max()))
