"""Tests of sftjax.export against independent references: transformers (float32, use_cache=False) for merged HF
exports, ``peft.PeftModel.from_pretrained`` for adapters (plus a hand-merged numpy reference), the gguf package for
GGUF files."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftjax.train import checkpoint as ckpt
from sftjax.train import run_meta
from sftjax import export as ex
from sftjax.peft import adapter_io
from sftjax.config import LoraSection
from sftjax.errors import CheckpointError
from tests.oracle import assert_close, relative_error

from tests.conftest import require, error_line

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

VOCAB, LENGTH = 128, 16
TOKENS = np.array([[1, 5, 9, 33, 2, 77, 100, 3, 4, 8, 15, 16, 23, 42, 99, 127],
                   [7, 7, 1, 2, 3, 64, 65, 66, 10, 11, 12, 13, 0, 120, 121, 5]], dtype=np.int32)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> pathlib.Path:
    """A random tiny transformers Llama saved as a HF directory (the frozen base)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.8, 1.2)
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    model.save_pretrained(path)
    return path


def torch_logits(model) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS, dtype=torch.long), use_cache=False).logits.float().numpy()


def our_logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(TOKENS)))


def add_random_lora(model, lora: LoraSection, seed: int = 1):
    """Attach adapters like training would, then give B non-zero values (a fresh B is zero: nothing to test)."""
    from sftjax.peft.lora import apply_lora, linear_modules

    apply_lora(model, lora, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed)
    for path, module in linear_modules(model).items():
        if module.lora_b is not None:
            key, sub = jax.random.split(key)
            module.lora_b[...] = 0.3 * jax.random.normal(sub, module.lora_b[...].shape)


def perturb_magnitudes(model, seed: int = 2):
    """DoRA magnitudes as if trained: the initial column norms times U(0.5, 1.5)."""
    from sftjax.peft.lora import linear_modules

    rng = np.random.default_rng(seed)
    for module in linear_modules(model).values():
        if getattr(module, "lora_magnitude", None) is not None:
            m = np.asarray(module.lora_magnitude[...])
            module.lora_magnitude[...] = jnp.asarray(m * rng.uniform(0.5, 1.5, m.shape).astype(np.float32))


def load_ours(path):
    from sftjax.models.loading import load_model

    return load_model(path, dtype=jnp.float32)


def hand_merged_torch(base_path, model, model_config) -> np.ndarray:
    """Reference independent of PEFT: W_torch[out, in] += scale * (A @ B).T computed in numpy."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    modules = dict(reference.named_modules())
    for name, (a_IR, b_RO, scale) in adapter_io.lora_adapters(model, model_config).items():
        delta = scale * (np.asarray(a_IR, np.float64) @ np.asarray(b_RO, np.float64))
        with torch.no_grad():
            modules[name].weight += torch.tensor(delta.T, dtype=torch.float32)
    return torch_logits(reference)


# ------------------------------------------------------------------------------------------------ PEFT


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], [r"layers\.0\.(attn\.k_proj|mlp\.down_proj)"]])
def test_peft_adapter_loads_in_peft_with_our_logits(hf_base, tmp_path, targets):
    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=targets)
    model, model_config = load_ours(hf_base)
    add_random_lora(model, lora)
    ours = our_logits(model)
    out = adapter_io.write_peft_adapter(model, model_config, tmp_path / "adapter", lora=vars(lora),
                                base_model_name_or_path=str(hf_base))
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    plain = torch_logits(base)
    peft_model = peft.PeftModel.from_pretrained(base, out)
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(adapted) == len(adapter_io.lora_adapters(model, model_config))
    via_peft = torch_logits(peft_model)
    assert relative_error(via_peft, plain) > 1e-2  # the adapters really change the output
    assert_close(via_peft, ours, 1e-5, what="logits")
    assert_close(hand_merged_torch(hf_base, model, model_config), ours, 1e-5, what="logits")


@pytest.mark.parametrize("case", ["gemma3", "gemma4", "gemma4_ple_kv_shared"])
def test_peft_adapter_on_gemma3_and_gemma4(tmp_path, case):
    """all-linear LoRA on Gemma 3 (q/k norms, two RoPEs) and Gemma 4 (full layers with another head shape and no
    v_proj; per-layer input gates and projections, layers without k/v projections): the PEFT adapter loads in
    peft on the transformers model and gives our logits."""
    from tests.models.test_families import _make_hf_model

    _make_hf_model(case).save_pretrained(tmp_path / "base")
    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules="all-linear")
    model, model_config = load_ours(tmp_path / "base")
    add_random_lora(model, lora)
    ours = our_logits(model)
    out = adapter_io.write_peft_adapter(model, model_config, tmp_path / "adapter", lora=vars(lora),
                                        base_model_name_or_path=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    plain = torch_logits(base)
    peft_model = peft.PeftModel.from_pretrained(base, out)
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(adapted) == len(adapter_io.lora_adapters(model, model_config))
    via_peft = torch_logits(peft_model)
    assert relative_error(via_peft, plain) > 1e-2
    assert_close(via_peft, ours, 1e-5, what="logits")


def test_peft_rslora_scale(hf_base, tmp_path):
    lora = LoraSection(enabled=True, r=4, alpha=3.0, rslora=True, target_modules="all-linear")
    model, model_config = load_ours(hf_base)
    add_random_lora(model, lora, seed=3)
    out = adapter_io.write_peft_adapter(model, model_config, tmp_path / "a", lora=vars(lora),
                                base_model_name_or_path=str(hf_base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["r"] == 4 and config["lora_alpha"] == pytest.approx(3.0)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    assert_close(torch_logits(peft.PeftModel.from_pretrained(base, out)), our_logits(model), 1e-5, what="logits")


# ------------------------------------------------------------------------------------------------ from checkpoints


def _run_config(hf_base, lora: LoraSection, tokenizer: str | None = None) -> dict:
    return {"model": {"path": str(hf_base), "param_dtype": "float32"}, "tokenizer": {"path": tokenizer},
            "lora": vars(lora)}


def _save_checkpoint(run_dir, config, model, lora: LoraSection, step=10):
    from sftjax.peft.lora import trainable_filter

    with ckpt.CheckpointManager(run_dir / "checkpoints", config,
                                base_model={"path": config["model"]["path"],
                                            "fingerprint": run_meta.fingerprint_model(config["model"]["path"])}) as m:
        m.save(step, {"params": nnx.state(model, trainable_filter(lora))}, data_state={"index": 3})


def test_full_finetune_checkpoint_to_hf(hf_base, tmp_path, assets_dir):
    lora = LoraSection(enabled=False)
    model, model_config = load_ours(hf_base)
    model.layers[0].attn.q_proj.kernel[...] = model.layers[0].attn.q_proj.kernel[...] * 1.5  # "trained"
    model.norm.weight[...] = model.norm.weight[...] + 0.25
    ours = our_logits(model)
    config = _run_config(hf_base, lora, tokenizer=str(assets_dir / "tokenizers" / "smollm2"))
    _save_checkpoint(tmp_path / "run", config, model, lora)
    out = ex.export(tmp_path / "run", tmp_path / "hf", format="hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_close(torch_logits(exported), ours, 1e-5, what="logits")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (out / "generation_config.json").is_file()


def test_lora_checkpoint_to_hf_and_peft(hf_base, tmp_path):
    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model, model_config = load_ours(hf_base)
    add_random_lora(model, lora)
    ours = our_logits(model)
    _save_checkpoint(tmp_path / "run", _run_config(hf_base, lora), model, lora)

    merged = ex.export(tmp_path / "run" / "checkpoints" / "10", tmp_path / "merged", format="hf", dtype="float32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert_close(torch_logits(exported), ours, 1e-5, what="logits")

    adapter = ex.export(tmp_path / "run", tmp_path / "adapter", format="peft")
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    assert_close(torch_logits(peft.PeftModel.from_pretrained(base, adapter)), ours, 1e-5, what="logits")


def test_gguf_export_reads_back(hf_base, tmp_path):
    import gguf

    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "k_proj", "up_proj"])
    model, _ = load_ours(hf_base)
    add_random_lora(model, lora)
    ours = our_logits(model)
    _save_checkpoint(tmp_path / "run", _run_config(hf_base, lora), model, lora)

    exact = ex.export(tmp_path / "run", tmp_path / "model.gguf", format="gguf", dtype="f32")
    reader = gguf.GGUFReader(str(exact))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_up.weight", "output.weight"} <= names
    assert_close(our_logits(load_ours(exact)[0]), ours, 1e-5, what="logits")  # LoRA merged

    half = ex.export(tmp_path / "run", tmp_path / "half", format="gguf")  # default f16, into half/model.gguf
    assert half == tmp_path / "half" / "model.gguf"
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(half)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert_close(our_logits(load_ours(half)[0]), ours, 1e-2, what="float16 logits")


# ------------------------------------------------------------------------------------------------ bad input


def test_output_must_be_empty_unless_overwrite(hf_base, tmp_path, capsys):
    from sftjax.cli import main

    lora = LoraSection(enabled=False)
    model, _ = load_ours(hf_base)
    _save_checkpoint(tmp_path / "run", _run_config(hf_base, lora), model, lora)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["export", str(tmp_path / "run"), str(out), "--format", "hf"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "non-empty directory" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["export", str(tmp_path / "run"), str(out), "--format", "hf", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_bad_sources_and_options(hf_base, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no sftjax checkpoint found"):
        ex.export(foreign, tmp_path / "o1", format="hf")
    from sftjax.errors import ConfigError

    with pytest.raises(ConfigError, match="--dtype='int4'"):
        ex.export(foreign, tmp_path / "o2", format="hf", dtype="int4")
    lora = LoraSection(enabled=False)
    model, _ = load_ours(hf_base)
    _save_checkpoint(tmp_path / "run", _run_config(hf_base, lora), model, lora)
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        ex.export(tmp_path / "run", tmp_path / "o3", format="peft")
    assert not (tmp_path / "o3").exists()


def test_changed_base_model_is_detected(hf_base, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(hf_base, base)
    lora = LoraSection(enabled=True, r=2, alpha=4.0, target_modules=["q_proj"])
    model, _ = load_ours(base)
    add_random_lora(model, lora)
    _save_checkpoint(tmp_path / "run", _run_config(base, lora), model, lora)
    config = json.loads((base / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="changed since checkpoint"):
        ex.export(tmp_path / "run", tmp_path / "o", format="peft")


def test_plain_model_directory_converts_to_hf(hf_base, tmp_path):
    out = ex.export(hf_base, tmp_path / "copy", format="hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.bfloat16)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(reference.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="without LoRA adapters"):
        ex.export(hf_base, tmp_path / "adapter", format="peft")


@pytest.mark.parametrize("targets, use_dora", [("all-linear", False), (["q_proj", "up_proj"], False),
                                              ("all-linear", True), (["q_proj", "up_proj"], True)])
def test_peft_adapter_on_fused_phi3_modules(tmp_path, targets, use_dora):
    """Phi-3 stores q/k/v (and gate/up) as one fused HF module: the adapter becomes one of summed rank there (and
    with DoRA, one magnitude vector of the parts' side by side)."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = transformers.Phi3ForCausalLM(config).float()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.8, 1.2)
    base.save_pretrained(tmp_path / "phi3")
    lora = LoraSection(enabled=True, r=2, alpha=4.0, target_modules=targets, use_dora=use_dora)
    model, model_config = load_ours(tmp_path / "phi3")
    add_random_lora(model, lora)
    if use_dora:
        perturb_magnitudes(model)
    ours = our_logits(model)
    if use_dora and targets != "all-linear":  # peft's DoRA on qkv_proj would rescale the k and v rows too
        with pytest.raises(CheckpointError) as info:
            adapter_io.write_peft_adapter(model, model_config, tmp_path / "adapter", lora=vars(lora),
                                          base_model_name_or_path=str(tmp_path / "phi3"))
        assert "fused" in str(info.value) and "\n" not in str(info.value)
        return
    out = adapter_io.write_peft_adapter(model, model_config, tmp_path / "adapter", lora=vars(lora),
                                base_model_name_or_path=str(tmp_path / "phi3"))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is use_dora
    if targets == "all-linear":  # qkv_proj gets rank 3r, gate_up_proj 2r
        assert set(adapter_config["rank_pattern"].values()) == {6, 4}
    else:  # only the q rows / up rows of the fused weights change; the other rows of B are zero
        assert adapter_config["rank_pattern"] == {}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "phi3", dtype=torch.float32)
    plain = torch_logits(reloaded)
    via_peft = torch_logits(peft.PeftModel.from_pretrained(reloaded, out))
    assert relative_error(via_peft, plain) > 1e-2
    assert_close(via_peft, ours, 1e-5, what="logits")


def test_peft_adapter_with_modules_to_save(hf_base, tmp_path):
    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"],
                       modules_to_save=["lm_head", "embed_tokens", r"layers/1/mlp_norm"])
    model, model_config = load_ours(hf_base)
    add_random_lora(model, lora)
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 1.3  # "fully trained" modules
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] + 0.1
    model.layers[1].mlp_norm.weight[...] = model.layers[1].mlp_norm.weight[...] * 0.5
    ours = our_logits(model)
    out = adapter_io.write_peft_adapter(model, model_config, tmp_path / "adapter", lora=vars(lora),
                                base_model_name_or_path=str(hf_base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.layers.1.post_attention_layernorm"]
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    assert_close(torch_logits(peft.PeftModel.from_pretrained(base, out)), ours, 1e-5, what="logits")


def test_random_init_full_finetune_checkpoint_to_hf(tmp_path, assets_dir):
    """model.init without vocab_size: training took the vocabulary size from the tokenizer, so does export."""
    from sftjax.models.config import ModelConfig
    from sftjax.models.decoder import Decoder

    init = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
            "head_dim": 8, "max_position_embeddings": 64, "tie_word_embeddings": True}
    tokenizer_dir = assets_dir / "tokenizers" / "smollm2"
    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    model = Decoder(ModelConfig(vocab_size=vocab, **init), rngs=nnx.Rngs(7))
    ours = our_logits(model)
    lora = LoraSection(enabled=False)
    config = {"model": {"init": init, "param_dtype": "float32"}, "tokenizer": {"path": str(tokenizer_dir)},
              "lora": vars(lora)}
    with ckpt.CheckpointManager(tmp_path / "run" / "checkpoints", config) as m:
        m.save(4, {"params": nnx.state(model, nnx.Param)})
    out = ex.export(tmp_path / "run", tmp_path / "hf", format="hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_close(torch_logits(exported), ours, 1e-5, what="logits")


def test_dora_checkpoint_to_peft_and_hf(hf_base, tmp_path):
    """lora.use_dora: the PEFT adapter carries lora_magnitude_vector and peft loads it with our logits; the merged HF
    export is peft's merge_and_unload of the same adapter."""
    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    model, _ = load_ours(hf_base)
    add_random_lora(model, lora)
    perturb_magnitudes(model)
    ours = our_logits(model)
    _save_checkpoint(tmp_path / "run", _run_config(hf_base, lora), model, lora)
    adapter = ex.export(tmp_path / "run", tmp_path / "adapter", format="peft")
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 3 * 2
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    plain = torch_logits(base)
    peft_model = peft.PeftModel.from_pretrained(base, adapter)
    via_peft = torch_logits(peft_model)
    assert relative_error(via_peft, plain) > 1e-2
    assert_close(via_peft, ours, 1e-5, what="logits")
    merged = ex.export(tmp_path / "run", tmp_path / "merged", format="hf", dtype="float32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert_close(torch_logits(exported), torch_logits(peft_model.merge_and_unload()), 1e-5, what="merged logits")


# ------------------------------------------------------------------------------------------------ QLoRA


@pytest.fixture(scope="module")
def hf_base_64(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama whose linear inputs are multiples of 64 (NF4 blocks inside rows, as in real models)."""
    torch.manual_seed(2)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.8, 1.2)
    path = tmp_path_factory.mktemp("base64") / "tiny-llama"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_checkpoint_to_hf_and_peft(hf_base_64, tmp_path, double_quant):
    """A QLoRA run's checkpoint (adapters only) exports to merged HF weights = bitsandbytes' dequantized base + the
    adapters (transformers, and our QLoRA logits), and to a PEFT adapter that peft loads onto the original float
    base (= that base + the adapters) and onto the base quantized by bitsandbytes at load (= our QLoRA logits)."""
    require("bitsandbytes")
    from sftjax.peft.quant import quantize_model
    from tests.peft.test_quant import _bnb_round_trip_IO

    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    run_config = _run_config(hf_base_64, lora)
    run_config["model"].update(quantize="nf4", double_quant=double_quant)
    dense, model_config = load_ours(hf_base_64)
    model, _ = load_ours(hf_base_64)
    add_random_lora(model, lora)
    add_random_lora(dense, lora)  # the same adapters (same seed) on the float base
    quantize_model(model, "nf4", double_quant=double_quant)  # as a run does: adapters first, then the base
    ours = our_logits(model)
    _save_checkpoint(tmp_path / "run", run_config, model, lora)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "10" / "params" / "_METADATA").read_text())
    assert saved["tree_metadata"] and all("lora_a" in k or "lora_b" in k for k in saved["tree_metadata"])

    # merged: every attention/MLP weight is the dequantized NF4 base, adapted ones plus scale * A @ B
    merged = ex.export(tmp_path / "run", tmp_path / "merged", format="hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_base_64, dtype=torch.float32)
    modules = dict(reference.named_modules())
    adapters = adapter_io.lora_adapters(model, model_config)
    for name, module in modules.items():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w_OI = module.weight.detach().numpy()
            new_OI = _bnb_round_trip_IO(w_OI.T, "nf4", double_quant).T.astype(np.float64)
            if name in adapters:
                a_IR, b_RO, scale = adapters[name]
                new_OI = new_OI + scale * (np.asarray(a_IR, np.float64) @ np.asarray(b_RO, np.float64)).T
            with torch.no_grad():
                module.weight.copy_(torch.tensor(new_OI, dtype=torch.float32))
    assert len(adapters) == 3 * 2
    assert_close(torch_logits(exported), torch_logits(reference), 1e-5, what="merged QLoRA vs reference")
    assert_close(torch_logits(exported), ours, 1e-5, what="merged QLoRA vs ours")
    gguf_file = ex.export(tmp_path / "run", tmp_path / "model.gguf", format="gguf", dtype="f32")  # merged too
    assert_close(our_logits(load_ours(gguf_file)[0]), torch_logits(reference), 1e-5, what="merged QLoRA gguf")

    # PEFT adapter: onto the original float base, and onto bitsandbytes' NF4 of it
    adapter = ex.export(tmp_path / "run", tmp_path / "adapter", format="peft")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_base_64)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base_64, dtype=torch.float32)
    on_float = torch_logits(peft.PeftModel.from_pretrained(base, adapter))
    assert_close(on_float, our_logits(dense), 1e-5, what="adapter on the float base")
    assert relative_error(on_float, ours) > 1e-4  # the quantization is visible, so the next check means something
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32,
                                                 bnb_4bit_use_double_quant=double_quant)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(hf_base_64, dtype=torch.float32, device_map="cpu",
                                                                  quantization_config=bnb_config)
    # bitsandbytes' CPU Linear4bit forward multiplies at about bfloat16 precision (0.4% off a float32 matmul of its
    # own dequantized weight), so the base peft runs on is the float model holding the weights bitsandbytes
    # quantized at load, dequantized by bitsandbytes
    import bitsandbytes.functional as bnbF

    on_bnb = transformers.AutoModelForCausalLM.from_pretrained(hf_base_64, dtype=torch.float32)
    float_modules = dict(on_bnb.named_modules())
    count = 0
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            with torch.no_grad():
                float_modules[name].weight.copy_(bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state))
            count += 1
    assert count == 2 * 7
    # double quantization: bitsandbytes' absmax offset may differ from ours in its last bit (torch's summation
    # order; see tests/peft/test_quant.py), which moves a few dequantized weights by an ulp of their absmax
    assert_close(torch_logits(peft.PeftModel.from_pretrained(on_bnb, adapter)), ours,
                 1e-5 if not double_quant else 1e-4, what="adapter on bitsandbytes' NF4 base")


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True)])
def test_residual_init_checkpoint_to_peft_of_the_original_base(hf_base, tmp_path, init, rslora):
    """lora.init=pissa|olora trains on the residual base ``W - scale * A0 @ B0``: the PEFT adapter is peft's
    conversion to a plain LoRA of the original base (rank 2r: [A, A0], [B, -B0]), which peft loads onto the
    unchanged base with our logits; the merged HF export is the residual plus the trained adapters."""
    from sftjax.peft.lora import apply_lora, linear_modules

    lora = LoraSection(enabled=True, r=4, alpha=8.0, rslora=rslora, target_modules=["q_proj", "v_proj", "up_proj"],
                       init=init)
    model, _ = load_ours(hf_base)
    apply_lora(model, lora, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    for module in linear_modules(model).values():  # "trained": both factors moved off their init
        if module.lora_a is not None:
            for factor in (module.lora_a, module.lora_b):
                factor[...] = factor[...] + jnp.asarray(0.05 * rng.normal(size=factor[...].shape), jnp.float32)
    ours = our_logits(model)
    _save_checkpoint(tmp_path / "run", _run_config(hf_base, lora), model, lora)
    adapter = ex.export(tmp_path / "run", tmp_path / "adapter", format="peft")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    plain = torch_logits(base)
    via_peft = torch_logits(peft.PeftModel.from_pretrained(base, adapter))
    assert relative_error(via_peft, plain) > 1e-2
    assert_close(via_peft, ours, 1e-5, what=f"{init} adapter on the original base")
    merged = ex.export(tmp_path / "run", tmp_path / "merged", format="hf", dtype="float32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert_close(torch_logits(exported), ours, 1e-5, what=f"{init} merged")


def test_residual_init_peft_export_refusals(hf_base, tmp_path):
    from sftjax.peft.lora import apply_lora

    lora = LoraSection(enabled=True, r=2, alpha=4.0, target_modules=["q_proj"], init="pissa")
    model, model_config = load_ours(hf_base)
    apply_lora(model, lora, rngs=nnx.Rngs(1))
    with pytest.raises(CheckpointError, match="lora.init=pissa: the adapter of a run that rewrote the base"):
        adapter_io.write_peft_adapter(model, model_config, tmp_path / "a", lora=vars(lora),
                                      base_model_name_or_path=str(hf_base))
    dora = LoraSection(enabled=True, r=2, alpha=4.0, target_modules=["q_proj"], init="pissa", use_dora=True)
    model, model_config = load_ours(hf_base)
    apply_lora(model, dora, rngs=nnx.Rngs(1))
    initial = adapter_io.lora_adapters(model, model_config)
    with pytest.raises(CheckpointError, match="lora.init=pissa with DoRA cannot be written as a PEFT adapter"):
        adapter_io.write_peft_adapter(model, model_config, tmp_path / "b", lora=vars(dora),
                                      base_model_name_or_path=str(hf_base), initial_adapters=initial)
