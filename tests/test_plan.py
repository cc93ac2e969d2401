"""sftjax plan: parameter counts and sharded bytes against real models, the 8B LoRA recipe against the analytic
LoRA formula, the --compile path, JSON and CLI output, and one-line errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sftjax.config import load_config
from sftjax.plan.compile import compile_memory
from sftjax.plan.estimate import Plan, plan
from tests.conftest import REPO_ROOT, error_line

TINY = str(REPO_ROOT / "configs" / "tiny_cpu.yaml")
LLAMA_8B = str(REPO_ROOT / "configs" / "llama31_8b_lora_1gpu.yaml")
SMALL_INIT = ["model.init.vocab_size=255", "model.init.hidden_size=48", "model.init.intermediate_size=96",
              "model.init.num_heads=4", "model.init.num_kv_heads=2", "model.init.head_dim=12",
              "model.init.tie_word_embeddings=false"]

# Llama-3.1-8B's published config.json shapes
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
}


def _item(result: Plan, name: str) -> int:
    return {n: b for n, b, _ in result.memory}[name]


def _real_model(cfg, tokenizer=None):
    """The trainer's model built for real (random init, LoRA if enabled)."""
    from sftjax.peft.lora import apply_lora
    from sftjax.train.program import build_model

    model, _ = build_model(cfg, tokenizer=tokenizer)
    apply_lora(model, cfg.lora, rngs=nnx.Rngs(params=1, dropout=2))
    return model


def test_tiny_config_parameter_count_equals_a_real_decoder(assets_dir):
    from sftjax.models.tokenizer import load_tokenizer

    tokenizer_path = assets_dir / "tokenizers" / "smollm2"
    cfg = load_config(TINY, [f"tokenizer.path={tokenizer_path}"])
    result = plan(cfg, devices=1, device_kind="cpu")
    model = _real_model(cfg, load_tokenizer(tokenizer_path))
    assert model.config.vocab_size == 49152
    real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert result.params_base == result.params_total == result.params_trainable == real
    assert result.architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("lora, optimizer", [(False, "adamw"), (True, "adamw"), (False, "adafactor"),
                                             (False, "sgd")])
def test_sharded_bytes_equal_real_shards_on_8_devices(lora, optimizer):
    from sftjax.sharding import make_mesh, shard_model
    from sftjax.peft.lora import split_model
    from sftjax.train.optim import make_optimizer
    from sftjax.train.step import TrainState

    overrides = SMALL_INIT + ["train.mesh.data=2", "train.mesh.fsdp=2", "train.mesh.tensor=2",
                              f"lora.enabled={str(lora).lower()}", "lora.r=4", f"optim.name={optimizer}",
                              "optim.momentum=0.9"]
    if optimizer == "adafactor":  # dimensions >= 128, so that adafactor factors its second moments
        overrides += ["model.init.hidden_size=128", "model.init.intermediate_size=256", "model.init.head_dim=32"]
    cfg = load_config(TINY, overrides)
    result = plan(cfg, devices=8, device_kind="cpu")
    assert result.mesh == {"data": 2, "fsdp": 2, "tensor": 2}

    mesh = make_mesh(2, 2, 2)
    model = shard_model(_real_model(cfg), mesh)
    _, trainable, frozen = split_model(model, cfg.lora)
    tx, _ = make_optimizer(cfg.optim, 10)
    replicated = NamedSharding(mesh, PartitionSpec())
    # as the trainer places its state: sharded leaves keep their layout, counters go replicated
    opt_state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
                             TrainState.create(trainable, tx).opt_state)

    def per_device(tree):
        totals = {device: 0 for device in jax.devices()}
        for leaf in jax.tree.leaves(tree):
            for shard in leaf.addressable_shards:
                totals[shard.device] += shard.data.nbytes
        assert len(set(totals.values())) == 1, totals  # every device holds the same amount
        return next(iter(totals.values()))

    assert _item(result, "frozen weights") == per_device(frozen)
    assert _item(result, "trainable weights") == per_device(trainable)
    assert _item(result, "optimizer state") == per_device(opt_state)
    # something really is split (the test would not see a wrong rule otherwise) and something is replicated
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves((trainable, frozen)))
    assert per_device(trainable) + per_device(frozen) < total / 2


def test_llama31_8b_lora_reads_only_the_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail
    cfg = load_config(LLAMA_8B, [f"model.path={tmp_path}"])
    result = plan(cfg, device_kind="h100")

    d, f, v, layers = 4096, 14336, 128256, 32
    q, kv = 32 * 128, 8 * 128
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    assert result.params_base == 2 * v * d + layers * per_layer + d == 8_030_261_248
    assert abs(result.params_base - 8.03e9) < 0.01e9
    linears = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # all-linear, head excluded
    lora = cfg.lora.r * sum(i + o for i, o in linears) * layers
    assert result.params_trainable == lora == result.params_total - result.params_base
    assert result.devices == 1 and result.device.name == "h100"
    # bfloat16 on one device, plus the LoRA dropout RNG state (a key and a counter per adapted layer)
    assert 0 <= _item(result, "frozen weights") - 2 * result.params_base <= 7 * layers * 12
    assert result.fits
    assert result.steps is None and result.run_time_s is None  # train.epochs: steps depend on the data
    assert result.tokens_per_step == 16 * 2048
    assert result.step_time_s > 0
    text = result.format()
    assert "ESTIMATE" in text and "FITS" in text and "dataset size" in text


def test_compile_reports_positive_numbers():
    cfg = load_config(TINY, SMALL_INIT + ["train.mesh.data=4", "train.mesh.fsdp=2"])
    compiled = compile_memory(cfg)
    assert compiled["devices"] == jax.device_count()
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_estimate_bytes"):
        assert compiled[key] > 0, (key, compiled)


def test_cli_json_parses_and_text_has_verdict(capsys):
    from sftjax.cli import main

    assert main(["plan", TINY, *SMALL_INIT, "--json", "--device", "tpu-v5e", "--devices", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"] is True and out["devices"] == 2 and out["device"]["name"] == "tpu-v5e"
    assert out["verdict"] == "FITS" and out["total_bytes_per_device"] > 0
    assert out["throughput"]["steps"] == 30 and out["throughput"]["run_time_s"] > 0
    assert main(["plan", TINY, "--mfu", "0.5", *SMALL_INIT, "train.steps=7"]) == 0
    text = capsys.readouterr().out
    assert "verdict: FITS" in text and "MFU 50%" in text and "7 steps" in text


def test_does_not_fit_when_the_model_is_too_big(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    cfg = load_config(LLAMA_8B, [f"model.path={tmp_path}", "lora.enabled=false", "model.param_dtype=float32"])
    result = plan(cfg, device_kind="tpu-v5e")
    assert not result.fits
    assert result.largest(1)[0][0] == "optimizer state"
    assert "DOES NOT FIT" in result.format()


@pytest.mark.parametrize("override, expected", [
    ("model.path=/nonexistent/model", "does not exist"),
    ("model.path={tmp}", "config.json not found"),
    ("train.mesh.tensor=3", "train.mesh"),
])
def test_errors_are_one_line(tmp_path, capsys, override, expected):
    from sftjax.cli import main

    base = [] if override.startswith("train") else ["model.init=null"]
    args = ["plan", TINY, *base, override.format(tmp=tmp_path), "--devices", "8"]
    assert main(args) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("sftjax: error:") and expected in err


@pytest.mark.parametrize("remat, lora, scan, dtype, length", [
    ("none", False, False, "float32", 256),
    ("none", False, False, "float32", 64),  # the dense reference attention below L = 256 on the CPU
    ("full", True, True, "bfloat16", 256),
    ("save_dots", True, True, "float32", 256),
    ("none", True, False, "bfloat16", 256),
])
def test_saved_activations_match_what_jax_saves_for_backward(remat, lora, scan, dtype, length):
    """The activation formula against JAX's own list of residuals saved for the backward pass (the real model's
    summed loss; weights, constants, foldable broadcasts and the loss's own residuals left out)."""
    from jax._src.ad_checkpoint import saved_residuals

    from sftjax.models.scan import stack_layers
    from sftjax.peft.lora import split_model
    from sftjax.train.step import LossOptions, forward_loss

    overrides = SMALL_INIT + [f"data.max_length={length}", "train.micro_batch_size=2", "train.global_batch_size=2",
                              f"model.remat={remat}", f"lora.enabled={str(lora).lower()}", "lora.dropout=0.1",
                              "train.mesh.data=1", f"model.scan_layers={str(scan).lower()}",
                              f"model.param_dtype={dtype}", f"model.compute_dtype={dtype}"]
    cfg = load_config(TINY, overrides)
    result = plan(cfg, devices=1, device_kind="cpu")
    model = _real_model(cfg)
    if scan:
        stack_layers(model)
    graphdef, trainable, frozen = split_model(model, cfg.lora)
    batch = {k: np.ones((2, length), np.int32) for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    options = LossOptions(dropout=lora, compute_dtype=jax.numpy.dtype(dtype))

    def loss(params, frozen, batch):
        return forward_loss(graphdef, params, frozen, batch, jax.random.key(0), options).loss_sum

    saved = 0
    for value, source in saved_residuals(loss, trainable, frozen, batch):
        if not any(word in source for word in ("argument", "constant", "literal", "broadcast_in_dim",
                                               "cross_entropy")):
            saved += int(np.prod(value.shape)) * value.dtype.itemsize
    estimate = _item(result, "activations saved for backward") + _item(result, "activations outside the layers")
    attention_note = {n: note for n, _, note in result.memory}["attention working set"]
    if remat == "none" and attention_note.startswith("reference"):
        estimate += _item(result, "attention working set")
    assert 0.8 * saved <= estimate <= 1.25 * saved, (estimate, saved)


def test_gguf_model_counts_its_tensors(smollm2_gguf):
    """A .gguf model.path: the plan's parameter count equals the element count of the file's tensors."""
    import gguf

    cfg = load_config(str(REPO_ROOT / "configs" / "smollm2_135m_cpu.yaml"), [f"model.path={smollm2_gguf}"])
    result = plan(cfg, devices=1, device_kind="h100")
    reader = gguf.GGUFReader(str(smollm2_gguf), "r")
    assert result.params_base == sum(int(t.n_elements) for t in reader.tensors if t.name != "rope_freqs.weight")
    assert result.params_trainable == result.params_total - result.params_base > 0  # LoRA adapters


@pytest.mark.parametrize("double_quant, scan", [(False, False), (True, True)])
def test_nf4_base_bytes_are_half_a_byte_per_param_plus_absmax(assets_dir, double_quant, scan):
    """model.quantize=nf4: the frozen quantized line is 4 bits per weight + the per-64 absmax (float32, or 8-bit
    codes + a float32 per 256 of them + one offset with double quantization), counted here from the shapes."""
    from sftjax.models.tokenizer import load_tokenizer

    tokenizer_path = assets_dir / "tokenizers" / "smollm2"
    overrides = [f"tokenizer.path={tokenizer_path}", "lora.enabled=true", "lora.r=4", "model.quantize=nf4",
                 f"model.double_quant={str(double_quant).lower()}", f"model.scan_layers={str(scan).lower()}"]
    cfg = load_config(TINY, overrides)
    result = plan(cfg, devices=1, device_kind="cpu")
    dense = plan(load_config(TINY, [f"tokenizer.path={tokenizer_path}", "lora.enabled=true", "lora.r=4"]),
                 devices=1, device_kind="cpu")
    mc = _real_model(cfg, load_tokenizer(tokenizer_path)).config
    d, f, q, kv = mc.hidden_size, mc.intermediate_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]  # [out, in] of each attention/MLP linear
    expected, params = 0, 0
    for out_features, in_features in shapes:
        n = out_features * in_features
        blocks = -(-n // 64)
        absmax = blocks * 4 if not double_quant else blocks + 4 * -(-blocks // 256) + 4
        expected += mc.num_layers * (-(-n // 2) + absmax)
        params += mc.num_layers * n
    assert _item(result, "frozen quantized weights") == expected
    per_param = 0.5 + (4 / 64 if not double_quant else 1 / 64 + 4 / (64 * 256))  # 0.5625 (0.5157) bytes
    assert expected == pytest.approx(per_param * params, rel=5e-3)  # + the per-weight rounding (tiny: visible)
    # the dense frozen weights lose exactly the quantized kernels (float32: 4 bytes per param)
    assert _item(dense, "frozen weights") - _item(result, "frozen weights") == 4 * params
    assert result.params_total == dense.params_total and result.params_trainable == dense.params_trainable


QWEN3_MOE_TINY = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 40, "moe_intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [0],
    "decoder_sparse_step": 1, "norm_topk_prob": True, "tie_word_embeddings": False, "max_position_embeddings": 64,
}


def test_moe_total_active_parameters_and_expert_memory_per_device(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_MOE_TINY))
    cfg = load_config(TINY, ["model.init=null", f"model.path={tmp_path}", "train.mesh.data=2", "train.mesh.fsdp=4",
                             "train.mesh.tensor=1"])
    result = plan(cfg, devices=8, device_kind="cpu")
    d, v, f, f_expert, experts, k = 32, 96, 40, 16, 8, 2
    attention = d * 32 + 2 * d * 16 + 32 * d + 2 * 8 + 2 * d  # q, k, v, o, q/k norms, the two layer norms
    expert = 3 * d * f_expert
    dense_layer = attention + 3 * d * f
    moe_layer = attention + d * experts + experts * expert  # router + stacked experts
    total = 2 * v * d + d + dense_layer + 3 * moe_layer  # layer 0 dense (mlp_only_layers), layers 1-3 MoE
    assert result.params_base == result.params_total == total == 60256
    assert result.params_active == total - 3 * (experts - k) * expert == 32608
    assert result.experts_per_device == experts // 4
    assert result.expert_bytes == 3 * (experts // 4) * expert * 4  # float32, two whole experts per layer and device
    text = result.format()
    assert "32.61K (32,608) active per token; 2 experts per device" in text
    assert json.loads(json.dumps(result.to_dict()))["params"]["active"] == 32608


GEMMA4_MOE_TINY = {
    "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 40, "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "global_head_dim": 8, "attention_k_eq_v": False, "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"], "hidden_size_per_layer_input": 0,
    "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "tie_word_embeddings": True,
    "max_position_embeddings": 64,
}


def test_gemma4_moe_total_active_parameters_and_expert_memory_per_device(tmp_path):
    """Gemma 4 26B-A4B shapes by hand: per layer the attention, the dense MLP (always active), the router with its
    input scale and per-expert scale, 8 experts of which 2 are active, seven norms and the layer scalar."""
    (tmp_path / "config.json").write_text(json.dumps(GEMMA4_MOE_TINY))
    cfg = load_config(TINY, ["model.init=null", f"model.path={tmp_path}", "train.mesh.data=2", "train.mesh.fsdp=4",
                             "train.mesh.tensor=1"])
    result = plan(cfg, devices=8, device_kind="cpu")
    d, v, f, f_expert, experts, k, layers = 32, 96, 40, 16, 8, 2, 2
    attention = d * 32 + 2 * d * 16 + 32 * d + 2 * 8  # q, k, v, o, q/k norms
    expert = 3 * d * f_expert
    router = d * experts + d + experts  # proj, scale, per-expert scale
    norms = 7 * d + 1  # input, post-attention, the two branches' in/out norms, post-feedforward; the layer scalar
    total = v * d + d + layers * (attention + 3 * d * f + router + experts * expert + norms)
    assert result.params_base == result.params_total == total == 42_578
    assert result.params_active == total - layers * (experts - k) * expert == 24_146
    assert result.experts_per_device == experts // 4
    assert result.expert_bytes == layers * (experts // 4) * expert * 4  # float32, 2 whole experts per layer


def test_llama31_8b_qlora_step_at_4096_tokens_fits_a_24gb_gpu(tmp_path):
    """model.quantize=nf4 on Llama-3.1-8B (the 1-GPU recipe: bf16, remat full, LoRA r=16 all-linear), one row of
    4096 tokens per step: the plan's main lines equal the hand arithmetic below, and the total fits a 24 GB A10
    with jax's default preallocation (75%); the same run without NF4 does not."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    overrides = [f"model.path={tmp_path}", "data.max_length=4096", "train.micro_batch_size=1",
                 "train.global_batch_size=1", "lora.dropout=0.0"]
    result = plan(load_config(LLAMA_8B, overrides + ["model.quantize=nf4"]), device_kind="a10")
    dense = plan(load_config(LLAMA_8B, overrides), device_kind="a10")

    d, f, v, layers, r = 4096, 14336, 128256, 32, 16
    q, kv = 32 * 128, 8 * 128
    linears_IO = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    quantized = layers * sum(i * o for i, o in linears_IO)  # 6.98B weights at 4 bits + a float32 absmax per 64
    assert quantized == 6_979_321_856
    assert _item(result, "frozen quantized weights") == quantized // 2 + 4 * (quantized // 64)  # 3.66 GiB
    assert _item(result, "frozen weights") == 2 * (2 * v * d + (2 * layers + 1) * d)  # embeddings, head, norms
    lora = layers * r * sum(i + o for i, o in linears_IO)
    assert result.params_trainable == lora == 41_943_040
    assert _item(result, "trainable weights") == 2 * lora  # bf16
    assert _item(result, "gradient accumulator") == 4 * lora
    assert _item(result, "activations saved for backward") == 4096 * d * 2 * layers  # bf16 layer inputs
    budget = int(0.75 * 23028 * 2**20)  # jax preallocates 75% of the A10's 23028 MiB
    assert result.device.name == "a10" and result.device.budget_bytes == budget
    hand = (quantized // 2 + 4 * (quantized // 64)) + 2 * (2 * v * d + (2 * layers + 1) * d) + 2 * lora + 4 * lora \
        + 4096 * d * 2 * layers
    assert hand < result.total_bytes < budget, (hand, result.total_bytes, budget)
    assert result.fits and "FITS" in result.format()
    # the dense bf16 base alone (16 GB) leaves no room: NF4 is what makes it fit
    assert _item(dense, "frozen weights") == 2 * (quantized + 2 * v * d + (2 * layers + 1) * d)
    assert not dense.fits


GEMMA4_PLE_TINY = {
    "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "global_head_dim": 16, "num_global_key_value_heads": 1, "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"] * 2, "hidden_size_per_layer_input": 4,
    "vocab_size_per_layer_input": 80, "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
    "tie_word_embeddings": True, "max_position_embeddings": 64,
}


def test_gemma4_per_layer_inputs_and_shared_kv_parameter_count(tmp_path):
    """Gemma 4 E2B/E4B shapes by hand: the per-layer embedding table (80 x 4 layers x 4), its projection and norm;
    per layer a gate, a projection and a norm; the shared layers 2 and 3 have no k/v projections or k norm and
    a double-wide MLP."""
    (tmp_path / "config.json").write_text(json.dumps(GEMMA4_PLE_TINY))
    cfg = load_config(TINY, ["model.init=null", f"model.path={tmp_path}", "train.mesh.data=1", "train.mesh.fsdp=1",
                             "train.mesh.tensor=1"])
    result = plan(cfg, devices=1, device_kind="cpu")
    d, f, v, layers, p = 32, 64, 96, 4, 4
    ple = 80 * layers * p + d * layers * p + p + layers * (d * p + p * d + d)
    norms = 4 * d + 1  # input, post-attention, pre- and post-feedforward norms, the layer scalar

    def attention(q_dim, kv_dim, head_dim, shared):
        return 2 * d * q_dim + head_dim + (0 if shared else 2 * d * kv_dim + head_dim)

    # full layers: head_dim 16 with the model's 2 kv heads (num_global_key_value_heads applies with k_eq_v only)
    layer = [attention(32, 16, 8, False) + 3 * d * f, attention(64, 32, 16, False) + 3 * d * f,
             attention(32, 16, 8, True) + 3 * d * 2 * f, attention(64, 16, 16, True) + 3 * d * 2 * f]
    total = v * d + d + ple + sum(layer) + layers * norms
    assert result.params_base == total == 58_864


@pytest.mark.parametrize("backend, given, expected", [("tpu", None, "megablox"), ("gpu", None, "ragged_dot"),
                                                      ("tpu", "ragged_dot", "ragged_dot")])
def test_compile_target_resolves_the_experts_grouped_matmul_by_the_targets_rule(tmp_path, backend, given, expected):
    """``plan --compile --target`` picks the grouped matmul by the target's rule (megablox on a TPU), not by this
    CPU machine's; an explicit choice stays."""
    from sftjax.plan.compile import _for_backend

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_MOE_TINY))
    overrides = ["model.init=null", f"model.path={tmp_path}"] + (
        [f"model.moe.implementation={given}"] if given else [])
    cfg = load_config(TINY, overrides)
    resolved, kernels = _for_backend(cfg, backend, 256, 10_000, moe=True)
    assert kernels["moe"] == resolved.model.moe["implementation"] == expected
    assert "moe" not in _for_backend(cfg, backend, 256, 10_000)[1]  # a dense model has no grouped matmul
