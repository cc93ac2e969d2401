"""load_model / build_model / save_model / load_tokenizer: dtypes, shards, LoRA merge on export, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.conftest import require  # noqa: E402

torch = require("torch")
transformers = require("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sftjax.errors import CheckpointError, SftjaxError  # noqa: E402
from sftjax.models.loading import load_model, save_model
from sftjax.models.tokenizer import load_tokenizer
from sftjax.models.weights import iter_hf_tensors, model_from_hf_tensors  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

VOCAB = 96


def _tiny_llama(tie=False):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = _tiny_llama()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    return directory, model


TOKENS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 16)).astype(np.int32)


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS).long(), use_cache=False).logits.float().numpy()


def _logits(model):
    return np.asarray(model(jnp.asarray(TOKENS)))


def test_build_model_from_state_dict_tensors(hf_dir):
    _, hf_model = hf_dir
    tensors = ((name, t.numpy()) for name, t in hf_model.state_dict().items())
    model, config = model_from_hf_tensors(hf_model.config.to_dict(), tensors, dtype=jnp.float32, source="state_dict")
    assert config.num_layers == 2 and config.num_kv_heads == 2 and not config.tie_word_embeddings
    assert_close(_logits(model), _hf_logits(hf_model), 1e-5, what="logits")


def test_iter_hf_tensors_reproduces_the_state_dict(hf_dir):
    directory, hf_model = hf_dir
    model, config = load_model(directory)
    ours = dict(iter_hf_tensors(model, config))
    state = hf_model.state_dict()
    assert set(ours) == set(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


def test_build_model_names_bad_shape_and_missing_tensor(hf_dir):
    _, hf_model = hf_dir
    state = {name: t.numpy() for name, t in hf_model.state_dict().items()}
    bad = dict(state)
    bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 31), np.float32)
    with pytest.raises(CheckpointError, match=r"mem: tensor model\.layers\.1\.mlp\.up_proj\.weight has shape"):
        model_from_hf_tensors(hf_model.config.to_dict(), bad.items(), dtype=jnp.float32, source="mem")
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"mem: missing tensor model\.norm\.weight"):
        model_from_hf_tensors(hf_model.config.to_dict(), missing.items(), dtype=jnp.float32, source="mem")
    extra = dict(state, **{"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.self_attn.q_norm.weight"):
        model_from_hf_tensors(hf_model.config.to_dict(), extra.items(), dtype=jnp.float32, source="mem")


def test_bfloat16_load_and_save_writes_bfloat16(hf_dir, tmp_path):
    directory, hf_model = hf_dir
    model, config = load_model(directory, dtype=jnp.bfloat16)
    assert model.layers[0].attn.q_proj.kernel.get_value().dtype == jnp.bfloat16
    assert config.param_dtype == "bfloat16"
    out = save_model(model, config, tmp_path / "bf16")
    with safe_open(str(out / "model.safetensors"), framework="np") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    # bf16 weights: logits close to the float32 original at bf16 precision
    assert_close(_hf_logits(reloaded.float()), _hf_logits(hf_model), 2e-2, what="bf16 logits")


def test_sharded_output_with_index_round_trips(hf_dir, tmp_path):
    directory, hf_model = hf_dir
    model, config = load_model(directory)
    out = save_model(model, config, tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert len(index["weight_map"]) == len(hf_model.state_dict())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_close(_hf_logits(reloaded), _hf_logits(hf_model), 1e-6, what="reloaded logits")
    again, _ = load_model(out)  # and our own loader reads the index
    assert_close(_logits(again), _hf_logits(hf_model), 1e-5, what="logits")


def test_save_model_merges_lora_adapters(hf_dir, tmp_path):
    directory, _ = hf_dir
    model, config = load_model(directory)
    q_proj = model.layers[1].attn.q_proj
    q_proj.enable_lora(4, 8.0, rngs=nnx.Rngs(1))
    q_proj.lora_b.set_value(jnp.asarray(np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)))
    with_adapter = _logits(model)
    out = save_model(model, config, tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_close(_hf_logits(reloaded), with_adapter, 1e-5, what="merged logits")


def test_tied_checkpoint_round_trip(tmp_path):
    hf_model = _tiny_llama(tie=True)
    hf_model.save_pretrained(tmp_path / "tied")
    model, config = load_model(tmp_path / "tied")
    assert config.tie_word_embeddings and model.lm_head is None
    out = save_model(model, config, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings
    assert_close(_hf_logits(reloaded), _hf_logits(hf_model), 1e-6, what="reloaded logits")


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, SftjaxError)
    return message


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "nope")
    assert "nope" in _one_line(error) and "does not exist" in _one_line(error)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    message = _one_line(error)
    assert "config.json" in message and "GPT2LMHeadModel" in message
    assert "LlamaForCausalLM" in message and "Gemma2ForCausalLM" in message and "Phi3ForCausalLM" in message


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    assert "config.json" in _one_line(error) and "not valid JSON" in _one_line(error)


def test_missing_shard_is_named(hf_dir, tmp_path):
    directory, _ = hf_dir
    model, config = load_model(directory)
    out = save_model(model, config, tmp_path / "sharded", max_shard_bytes=20_000)
    victim = sorted(out.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as error:
        load_model(out)
    assert victim.name in _one_line(error) and "missing" in _one_line(error)


def test_truncated_shard_is_named(hf_dir, tmp_path):
    directory, _ = hf_dir
    model, config = load_model(directory)
    out = save_model(model, config, tmp_path / "truncated")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_model(out)
    assert "model.safetensors" in _one_line(error) and "truncated or corrupt" in _one_line(error)


def test_tensor_shape_disagreeing_with_config_is_named(hf_dir, tmp_path):
    directory, _ = hf_dir
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    message = _one_line(error)
    assert re.search(r"tensor model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight has shape \[\d+, \d+\] but "
                     r"config\.json implies \[\d+, \d+\]", message), message
    assert str(tmp_path) in message


def test_no_weights_in_directory(hf_dir, tmp_path):
    directory, _ = hf_dir
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds only config.json .*, no weights; download the model's \\*.safetensors"):
        load_model(tmp_path)


def test_load_tokenizer_from_directory(assets_dir):
    tokenizer = load_tokenizer(assets_dir / "tokenizers" / "smollm2")
    assert len(tokenizer) == 49152
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"


def test_load_tokenizer_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_tokenizer(tmp_path / "none")
    assert "none" in _one_line(error)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as error:
        load_tokenizer(tmp_path / "empty")
    assert "empty" in _one_line(error) and "cannot load a tokenizer" in _one_line(error)


# ------------------------------------------------------------------------------------------------ quantize=


QUANT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def hf_dir_64(tmp_path_factory):
    """A tiny Llama whose linear inputs are multiples of 64 (NF4 blocks within rows, as in every real model)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp("tiny_llama_64")
    model.save_pretrained(directory)
    return directory, model


@pytest.mark.parametrize("fmt,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_load_model_quantized_computes_the_model_holding_the_bitsandbytes_round_trip(hf_dir_64, fmt, double_quant):
    """``load_model(path, quantize=...)`` against transformers running the same checkpoint with each attention and
    MLP weight replaced by bitsandbytes' dequantize(quantize(W)); embeddings, norms and head untouched, and the
    loaded model holds no full-precision copy of a quantized weight."""
    require("bitsandbytes")
    from sftjax.models.quant import QuantizedKernel, QuantizedWeight
    from tests.peft.test_quant import _bnb_round_trip_IO

    directory, _ = hf_dir_64
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    modules = dict(reference.named_modules())
    shapes = {}
    for layer in range(2):
        for name in QUANT_LINEARS:
            module = modules[f"model.layers.{layer}.{name}"]
            w_OI = module.weight.detach().numpy()
            shapes[f"layers.{layer}.{name}"] = w_OI.shape
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(
                    _bnb_round_trip_IO(w_OI.T, fmt, double_quant).T)))
    model, _ = load_model(directory, quantize=fmt, double_quant=double_quant)
    assert_close(_logits(model), _hf_logits(reference), 1e-5, what=f"{fmt} logits")

    # every attention/MLP kernel is quantized; embeddings, norms and the head are float32 params of their shapes
    kernels = [node.kernel for _, node in nnx.iter_graph(model) if isinstance(getattr(node, "kernel", None),
                                                                               QuantizedWeight)]
    assert len(kernels) == 2 * len(QUANT_LINEARS)
    params = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert all(v.dtype == jnp.float32 for v in params.values())
    dense_2d = sorted(k for k, v in params.items() if v.ndim == 2)
    assert dense_2d == ["embed_tokens/embedding", "lm_head/kernel"], dense_2d
    assert all(params[k].shape in ((VOCAB, 64), (64, VOCAB)) for k in dense_2d)
    assert all(v.ndim == 1 and v.shape == (64,) for k, v in params.items() if k not in dense_2d)  # the norms
    # the quantized arrays: exactly bitsandbytes' storage, counted from the shapes by hand
    stored = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, QuantizedKernel))}
    expected = 0
    for out_features, in_features in shapes.values():
        n = out_features * in_features
        if fmt == "int8":
            expected += n + 4 * out_features  # int8 codes + float32 SCB per row
        elif double_quant:
            expected += n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4  # codes, 8-bit absmax, scales, offset
        else:
            expected += n // 2 + 4 * (n // 64)  # two codes per byte + float32 absmax per block of 64
    assert sum(v.nbytes for v in stored.values()) == expected
    code_dtype = np.dtype(np.int8 if fmt == "int8" else np.uint8)
    assert {v.dtype for k, v in stored.items() if k.endswith("codes")} == {code_dtype}
    # nothing else in the model: its whole state is the params above plus the quantized arrays
    assert sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) == \
        expected + sum(v.nbytes for v in params.values())


def test_load_model_quantized_keeps_the_param_dtype_outside_the_linears(hf_dir_64):
    from sftjax.models.quant import QuantizedKernel

    directory, _ = hf_dir_64
    model, _ = load_model(directory, dtype=jnp.bfloat16, quantize="nf4")
    params = [v[...] for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert params and all(v.dtype == jnp.bfloat16 for v in params)
    stored = {str(p[-1]): v[...].dtype for p, v in nnx.to_flat_state(nnx.state(model, QuantizedKernel))}
    assert stored == {"codes": jnp.uint8, "absmax": jnp.float32}
    assert model.layers[0].attn.q_proj.kernel_dtype == jnp.bfloat16
    with pytest.raises(SftjaxError, match="load_model: quantize='nf8' is not one of none, nf4, int8"):
        load_model(directory, quantize="nf8")
