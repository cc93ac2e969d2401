"""The Trainer loop on the tiny CPU config: loss falls, eval runs, metrics and TensorBoard files are written,
hooks see every step, the final model loads back."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import jax

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_overrides(assets_dir, out_dir, *extra):
    return [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
            f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
            f"train.output_dir={out_dir}", "train.progress=false", *extra]


def test_fit_logs_evaluates_and_saves(assets_dir, tmp_path):
    import sftjax

    cfg = sftjax.load_config(REPO / "configs" / "tiny_cpu.yaml",
                             overrides=tiny_overrides(assets_dir, tmp_path, "train.steps=12", "train.eval_every=6",
                                                      "train.log_every=3"))
    trainer = sftjax.Trainer(cfg)
    assert trainer.mesh_sizes["data"] * trainer.mesh_sizes["fsdp"] == jax.device_count()
    seen = []
    trainer.add_hook(lambda t, step: seen.append((step, t.train_data.get_state()["step"])))
    before = trainer.evaluate()
    result = trainer.fit()
    assert seen == [(s, s) for s in range(1, 13)]  # hook after every step, data state in step with it
    assert trainer.train_step._cache_size() == 1

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert [r["step"] for r in evals] == [6, 12]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert evals[-1]["eval/loss"] < before["loss"]
    for key in ("grad_norm", "learning_rate", "tokens_per_s", "trained_tokens_per_s", "step_time_s",
                "nonfinite_steps"):
        assert key in train[-1] and np.isfinite(train[-1][key]), key
    assert "mfu" not in train[-1]  # a CPU has no datasheet peak: MFU only with train.peak_flops
    assert evals[-1]["eval/perplexity"] == pytest.approx(np.exp(evals[-1]["eval/loss"]), rel=1e-6)
    assert 0 <= evals[-1]["eval/token_accuracy"] <= 1
    assert result["eval"]["loss"] == pytest.approx(evals[-1]["eval/loss"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    model, model_config = sftjax.load_model(tmp_path / "final")
    assert model_config.hidden_size == 64
    trained = trainer.updated_model()
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]),
                                  np.asarray(trained.embed_tokens.embedding[...]))


def test_model_flops_per_token_by_hand():
    from sftjax.models.config import ModelConfig
    from sftjax import accelerators
    from sftjax.train.flops import device_peak_flops, model_flops_per_token

    # Llama-2-7B shapes: 6N + 12 * layers * heads * head_dim * L is the PaLM-style count for full fine-tuning
    config = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, head_dim=128)
    embed = 32000 * 4096
    num_params = 6_738_415_616
    full = model_flops_per_token(config, num_params=num_params, num_trainable_params=num_params, seq_len=4096)
    assert full == 6 * (num_params - embed) + 12 * 32 * 32 * 128 * 4096
    # LoRA: no weight gradients for the frozen matmuls (4N) plus 2x the adapters
    lora = model_flops_per_token(config, num_params=num_params, num_trainable_params=1_000_000, seq_len=4096)
    assert lora == 4 * (num_params - embed) + 2 * 1_000_000 + 12 * 32 * 32 * 128 * 4096
    # Gemma 4 style: five sliding layers of head_dim 256, one full layer of head_dim 512
    gemma4 = config.replace(num_layers=6, head_dim=256, global_head_dim=512, sliding_window=1024,
                            layer_types=("sliding_attention",) * 5 + ("full_attention",))
    attention = model_flops_per_token(gemma4, num_params=embed, num_trainable_params=0, seq_len=4096)
    assert attention == 12 * 32 * (5 * 256 + 512) * 4096
    assert accelerators.H100.peak_bf16_flops == 989e12 and accelerators.TPU_V5P.peak_bf16_flops == 459e12
    assert device_peak_flops() is None  # a CPU has no datasheet peak: no MFU unless train.peak_flops is set


def test_cpu_peak_is_calibrated_once_and_cached(tmp_path, monkeypatch):
    from sftjax.train import flops

    monkeypatch.setenv("SFTJAX_CACHE_DIR", str(tmp_path))
    calls = []
    real = flops._measure_cpu_flops
    monkeypatch.setattr(flops, "_measure_cpu_flops", lambda size, repeats: calls.append(1) or real(size, repeats))
    flops.calibrated_cpu_flops.cache_clear()
    first = flops.calibrated_cpu_flops(size=128, repeats=3)
    flops.calibrated_cpu_flops.cache_clear()  # a new process: read from the cache file, not measured again
    assert flops.calibrated_cpu_flops(size=128, repeats=3) == first and len(calls) == 1
    assert first > 1e8 and (tmp_path / "cpu_peak.json").is_file()
    flops.calibrated_cpu_flops.cache_clear()


def test_pissa_run_saves_a_peft_adapter_of_the_original_base(assets_dir, tmp_path):
    """train.save=adapter after lora.init=pissa (the base rewritten to its residual): peft loads the final adapter
    onto the unchanged base with the trained model's logits."""
    import jax.numpy as jnp
    import torch
    from tests.conftest import require

    import sftjax
    from tests.oracle import assert_close

    transformers, peft = require("transformers"), require("peft")
    tokenizer = sftjax.load_tokenizer(assets_dir / "tokenizers" / "smollm2")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)).float()
    base.save_pretrained(tmp_path / "base")
    cfg = sftjax.load_config(REPO / "configs" / "tiny_cpu.yaml", overrides=tiny_overrides(
        assets_dir, tmp_path / "run", "model.init=null", f"model.path={tmp_path / 'base'}", "train.steps=3",
        "train.eval_every=0", "train.save=adapter", "lora.enabled=true", "lora.r=4", "lora.alpha=8",
        "lora.init=pissa", "lora.target_modules=[q_proj,v_proj]", "optim.learning_rate=1e-2"))
    trainer = sftjax.Trainer(cfg)
    trainer.fit()
    tokens = np.arange(3, 19, dtype=np.int32)[None]
    ours = np.asarray(trainer.updated_model()(jnp.asarray(tokens)))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        plain = reloaded(torch.tensor(tokens).long(), use_cache=False).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(reloaded, tmp_path / "run" / "final")
        via_peft = adapted(torch.tensor(tokens).long(), use_cache=False).logits.numpy()
    assert np.abs(via_peft - plain).max() > 1e-3
    assert_close(via_peft, ours, 1e-5, what="pissa adapter on the original base")
