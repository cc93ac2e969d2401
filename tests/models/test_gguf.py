"""GGUF reading/writing against independent references.

* names, layout and the q/k RoPE permutation: transformers' own GGUF loader on the real SmolLM2 file;
* dequantization: gguf's quantizer (Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, error bounds) and, for the k-quants (not in the
  SmolLM2 file, and gguf has no quantizer for them), a scalar decoder written here from llama.cpp's C reference;
* tokenizer: the same tokenizer saved as HF files in the shared assets.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

gguf = require("gguf")
torch = require("torch")

from sftjax.errors import CheckpointError
from sftjax.models import gguf_read, gguf_tokenizer, gguf_write
from tests.oracle import assert_close

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _write_raw_gguf(path, tensors, *, arch="llama", metadata=True):
    """A GGUF file holding `tensors` ({name: (array, raw_type or None)}) and minimal llama metadata."""
    writer = gguf.GGUFWriter(str(path), arch)
    if metadata:
        writer.add_block_count(1)
        writer.add_embedding_length(32)
        writer.add_feed_forward_length(64)
        writer.add_head_count(2)
        writer.add_head_count_kv(1)
        writer.add_context_length(64)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(64)
    for name, (array, raw_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _decoded(path):
    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf_read._dequantize(t, path) for t in reader.tensors}


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2_read(smollm2_gguf):
    config, tensors = gguf_read.read_gguf_checkpoint(smollm2_gguf)
    return config, dict(tensors)


@pytest.fixture(scope="module")
def transformers_gguf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


def test_smollm2_config(smollm2_read):
    config, tensors = smollm2_read
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (
        576, 30, 9, 3, 1536, 49152)
    assert config["tie_word_embeddings"] and "lm_head.weight" not in tensors
    assert config["rope_theta"] == 100000.0 and config["eos_token_id"] == 2
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(a.dtype == np.float32 for a in tensors.values())


def test_smollm2_tensors_match_transformers_gguf_loader(smollm2_read, transformers_gguf_model):
    """transformers' loader is an independent implementation of the names, layout and q/k un-permutation."""
    _, ours = smollm2_read
    reference = {k: v for k, v in transformers_gguf_model.state_dict().items() if k != "lm_head.weight"}
    assert set(reference) == set(ours)
    for name, value in reference.items():
        np.testing.assert_array_equal(ours[name], value.numpy(), err_msg=name)


def test_smollm2_logits_match_transformers(smollm2_read, transformers_gguf_model):
    """A LlamaForCausalLM built from our config + tensors gives the logits of transformers' own GGUF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config, tensors = smollm2_read
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    tokens = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.no_grad():
        ours = model(tokens, use_cache=False).logits
        reference = transformers_gguf_model(tokens, use_cache=False).logits
    assert_close(ours, reference, 2e-6, what="logits")  # the same torch model on two readings of the weights


def test_rope_permutation_roundtrip():
    rows = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    permuted = gguf_write._rope_rows_to_ggml(rows, 4)
    assert not np.array_equal(permuted, rows)
    np.testing.assert_array_equal(gguf_read._rope_rows_from_ggml(permuted, 4), rows)
    # within a head, GGML's rows interleave the two halves HF keeps apart
    np.testing.assert_array_equal(permuted[:8:2], rows[:4])
    np.testing.assert_array_equal(permuted[1:8:2], rows[4:8])


# ---------------------------------------------------------------------------------------------------------------
# Dequantization


@pytest.mark.parametrize(
    "kind, bound_per_block",
    [
        (Q.Q8_0, lambda b: np.abs(b).max() / 127 * 0.5),
        (Q.Q4_0, lambda b: np.abs(b).max() / 8),
        (Q.Q4_1, lambda b: (b.max() - b.min()) / 15 * 0.5),
        (Q.Q5_0, lambda b: np.abs(b).max() / 16),
        (Q.Q5_1, lambda b: (b.max() - b.min()) / 31 * 0.5),
    ],
)
def test_block_quants_against_gguf_quantizer(tmp_path, kind, bound_per_block):
    rng = np.random.default_rng(int(kind))
    original = rng.normal(size=(8, 64)).astype(np.float32)
    quantized = gguf.quants.quantize(original, kind)
    decoded = _decoded(_write_raw_gguf(tmp_path / "q.gguf", {"w.weight": (quantized, kind)}))["w.weight"]
    assert decoded.shape == original.shape and decoded.dtype == np.float32
    blocks = original.reshape(-1, 32)
    error = np.abs(decoded.reshape(-1, 32) - blocks).max(axis=1)
    bounds = np.array([bound_per_block(b) for b in blocks]) * 1.01 + 1e-3
    assert np.all(error <= bounds)
    assert np.abs(decoded - original).mean() < np.abs(original).mean() / 4


def test_float_types(tmp_path):
    rng = np.random.default_rng(0)
    original = rng.normal(size=(4, 32)).astype(np.float32)
    bf16_bits = (original.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact for bf16 values
    decoded = _decoded(_write_raw_gguf(tmp_path / "f.gguf", {
        "a.weight": (original, None),
        "b.weight": (original.astype(np.float16), None),
        "c.weight": (bf16_bits.view(np.uint8).reshape(4, 64), Q.BF16),
    }))
    np.testing.assert_array_equal(decoded["a.weight"], original)
    np.testing.assert_array_equal(decoded["b.weight"], original.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(decoded["c.weight"], (bf16_bits.astype(np.uint32) << 16).view(np.float32))


def _f16(raw: bytes) -> float:
    return float(np.frombuffer(raw, dtype=np.float16)[0])


def _scale_min_k4(j, scales):
    """llama.cpp get_scale_min_k4: 6-bit scale and min number j of a Q4_K/Q5_K block."""
    if j < 4:
        return scales[j] & 63, scales[j + 4] & 63
    return ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))


def _reference_q4_k(block: bytes) -> list[float]:
    d, dmin, scales, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:144]
    out = []
    for chunk in range(4):
        sc1, m1 = _scale_min_k4(2 * chunk, scales)
        sc2, m2 = _scale_min_k4(2 * chunk + 1, scales)
        q = qs[32 * chunk: 32 * chunk + 32]
        out += [d * sc1 * (v & 0xF) - dmin * m1 for v in q]
        out += [d * sc2 * (v >> 4) - dmin * m2 for v in q]
    return out


def _reference_q5_k(block: bytes) -> list[float]:
    d, dmin, scales, qh, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:48], block[48:176]
    out = []
    for chunk in range(4):
        sc1, m1 = _scale_min_k4(2 * chunk, scales)
        sc2, m2 = _scale_min_k4(2 * chunk + 1, scales)
        q = qs[32 * chunk: 32 * chunk + 32]
        bit_low, bit_high = 1 << (2 * chunk), 2 << (2 * chunk)
        out += [d * sc1 * ((v & 0xF) + (16 if qh[i] & bit_low else 0)) - dmin * m1 for i, v in enumerate(q)]
        out += [d * sc2 * ((v >> 4) + (16 if qh[i] & bit_high else 0)) - dmin * m2 for i, v in enumerate(q)]
    return out


def _reference_q6_k(block: bytes) -> list[float]:
    ql, qh = block[0:128], block[128:192]
    scales = np.frombuffer(block[192:208], dtype=np.int8).tolist()
    d = _f16(block[208:210])
    out = [0.0] * 256
    for half in range(2):
        lo, hi, sc = ql[64 * half:], qh[32 * half:], scales[8 * half:]
        for lane in range(32):
            s = lane // 16
            q1 = ((lo[lane] & 0xF) | (((hi[lane] >> 0) & 3) << 4)) - 32
            q2 = ((lo[lane + 32] & 0xF) | (((hi[lane] >> 2) & 3) << 4)) - 32
            q3 = ((lo[lane] >> 4) | (((hi[lane] >> 4) & 3) << 4)) - 32
            q4 = ((lo[lane + 32] >> 4) | (((hi[lane] >> 6) & 3) << 4)) - 32
            base = 128 * half
            out[base + lane] = d * sc[s] * q1
            out[base + lane + 32] = d * sc[s + 2] * q2
            out[base + lane + 64] = d * sc[s + 4] * q3
            out[base + lane + 96] = d * sc[s + 6] * q4
    return out


@pytest.mark.parametrize(
    "kind, block_bytes, scale_offsets, reference",
    [
        (Q.Q4_K, 144, (0, 2), _reference_q4_k),
        (Q.Q5_K, 176, (0, 2), _reference_q5_k),
        (Q.Q6_K, 210, (208,), _reference_q6_k),
    ],
)
def test_k_quants_against_scalar_reference(tmp_path, kind, block_bytes, scale_offsets, reference):
    rng = np.random.default_rng(int(kind))
    rows, blocks_per_row = 2, 2
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:  # finite, moderate float16 super-block scales
        raw[:, offset:offset + 2] = np.frombuffer(
            rng.uniform(0.001, 0.1, size=rows * blocks_per_row).astype(np.float16).tobytes(), np.uint8).reshape(-1, 2)
    decoded = _decoded(_write_raw_gguf(tmp_path / "k.gguf", {"w.weight": (raw.reshape(rows, -1), kind)}))["w.weight"]
    expected = np.array([reference(bytes(block)) for block in raw], dtype=np.float64)
    expected = expected.reshape(rows, 256 * blocks_per_row)
    assert decoded.shape == expected.shape
    assert_close(decoded, expected, 1e-6, what="dequantized values")


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the problem


def _tiny_llama_tensors(raw_type_of_q=None):
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": (rng.normal(size=(64, 32)).astype(np.float32), None),
        "output_norm.weight": (np.ones(32, np.float32), None),
        "blk.0.attn_norm.weight": (np.ones(32, np.float32), None),
        "blk.0.attn_q.weight": (rng.normal(size=(32, 32)).astype(np.float32), None),
    }
    if raw_type_of_q is not None:
        bytes_per_row = 84  # one Q2_K block (256 values, 84 bytes) per row
        tensors["blk.0.attn_q.weight"] = (np.zeros((32, bytes_per_row), np.uint8), raw_type_of_q)
    return tensors


def _assert_one_line(error, *parts):
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_unsupported_quantization_names_file_tensor_and_type(tmp_path):
    path = _write_raw_gguf(tmp_path / "q2k.gguf", _tiny_llama_tensors(raw_type_of_q=Q.Q2_K))
    with pytest.raises(CheckpointError) as error:
        gguf_read.read_gguf_checkpoint(path)
    _assert_one_line(error, str(path), "blk.0.attn_q.weight", "Q2_K")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as error:
        gguf_read.read_gguf_checkpoint(tmp_path / "absent.gguf")
    _assert_one_line(error, "absent.gguf", "does not exist")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(CheckpointError) as error:
        gguf_read.read_gguf_checkpoint(path)
    _assert_one_line(error, str(path))


@pytest.mark.parametrize("keep_fraction", [0.05, 0.5, 0.98])
def test_truncated_file(tmp_path, keep_fraction):
    source = _write_raw_gguf(tmp_path / "full.gguf", _tiny_llama_tensors())
    gguf_read.read_gguf_checkpoint(source)  # the untruncated file is fine
    data = source.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError) as error:
        gguf_read.read_gguf_checkpoint(path)
    _assert_one_line(error, str(path))


def test_unknown_architecture(tmp_path):
    path = _write_raw_gguf(tmp_path / "arch.gguf", {"x.weight": (np.zeros(4, np.float32), None)}, arch="mamba9")
    with pytest.raises(CheckpointError) as error:
        gguf_read.read_gguf_checkpoint(path)
    _assert_one_line(error, str(path), "mamba9")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_matches_hf_files(smollm2_gguf, assets_dir):
    from transformers import AutoTokenizer

    ours = gguf_read.load_gguf_tokenizer(smollm2_gguf)
    reference = AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))
    texts = ["What is the capital of France?", "  leading spaces, tabs\tand\nnewlines\n\n",
             "naïve café — 日本語 😀 x=1+2; def f(a):\n    return a**2", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert ours(text, add_special_tokens=False)["input_ids"] == reference(
            text, add_special_tokens=False)["input_ids"], text
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    assert ours.chat_template == reference.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    for extra in (False, True):
        assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=extra) == \
            reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=extra)
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (
        reference.eos_token_id, reference.pad_token_id, reference.bos_token_id)
    assert len(ours) == len(reference) == 49152


# ---------------------------------------------------------------------------------------------------------------
# The SmolLM2 file through sftjax.load_model


def test_smollm2_load_model_logits_match_torch(smollm2_read):
    """sftjax.load_model on the alias vs a transformers Llama built from the same dequantized weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import sftjax

    config, tensors = smollm2_read
    reference = LlamaForCausalLM(LlamaConfig(**config)).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    reference.tie_weights()
    model, _ = sftjax.load_model("smollm2-135m-instruct")
    tokens = np.array([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575,
                        282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens), use_cache=False).logits.numpy()
    ours = np.asarray(model(tokens))
    assert_close(ours, expected, 2e-5, what="logits")  # 30 layers, |logits| ~ 30: float32 summation order


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _random_llama(tied: bool, seed: int = 0):
    """A random Llama as (config.json dict, HF state dict); weights large enough that q/k order matters."""
    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv_heads, head_dim, vocab, layers = 64, 128, 4, 2, 16, 49152, 2
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}

    def normal(*shape, std=0.15):
        return rng.normal(0.0, std, shape).astype(np.float32)

    state = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0), "model.norm.weight": 1 + normal(hidden)}
    if not tied:
        state["lm_head.weight"] = normal(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden, std=0.4),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden, std=0.4),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": 1 + normal(hidden),
            p + "post_attention_layernorm.weight": 1 + normal(hidden),
        })
    return config, state


def _torch_logits(config, state, tokens):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    if config["tie_word_embeddings"]:
        model.tie_weights()
    with torch.no_grad():
        return model(torch.from_numpy(tokens), use_cache=False).logits.numpy()


_TOKENS = np.array([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649]])


@pytest.fixture(scope="module")
def source_tokenizer(assets_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))


def _as_stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """What a 2-D weight becomes in a GGUF of ``dtype``, computed independently of the writer."""
    if array.ndim == 1 or dtype == "f32":
        return array
    if dtype == "f16":
        return array.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return torch.from_numpy(array).to(torch.bfloat16).to(torch.float32).numpy()
    return gguf.quants.dequantize(gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0)


@pytest.mark.parametrize("tied, dtype", [(True, "f32"), (False, "f16"), (True, "bf16"), (True, "q8_0")])
def test_write_gguf_roundtrip_logits(tmp_path, source_tokenizer, tied, dtype):
    """Decoder -> write_gguf -> sftjax.load_model gives transformers' logits on the weights rounded to ``dtype``."""
    import sftjax
    from sftjax.models.weights import model_from_hf_tensors

    config, state = _random_llama(tied)
    expected = _torch_logits(config, {k: _as_stored(v, dtype) for k, v in state.items()}, _TOKENS)
    model, model_config = model_from_hf_tensors(config, state.items(), source="test")
    path = gguf_write.write_gguf(model, model_config, source_tokenizer, tmp_path / "out.gguf", dtype=dtype)
    assert not list(tmp_path.glob("*.partial"))
    reloaded, reloaded_config = sftjax.load_model(path)
    assert reloaded_config.tie_word_embeddings == tied
    assert_close(reloaded(_TOKENS), expected, 2e-5, what="logits")
    if dtype != "f32":  # and the rounding is visible: the test would notice a writer that ignored dtype
        assert np.abs(_torch_logits(config, state, _TOKENS) - expected).max() > 1e-3


def test_written_gguf_contents(tmp_path, source_tokenizer):
    from sftjax.models.weights import model_from_hf_tensors

    config, state = _random_llama(tied=True)
    model, model_config = model_from_hf_tensors(config, state.items(), source="test")
    path = gguf_write.write_gguf(model, model_config, source_tokenizer, tmp_path / "m.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 2 + 2 * 9
    assert tensors["blk.1.attn_k.weight"].tensor_type == Q.Q8_0
    assert [int(d) for d in tensors["blk.1.attn_k.weight"].shape] == [64, 32]  # GGUF order: [in, out]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    # the stored q rows are llama.cpp's permutation of the HF rows
    stored_q = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, Q.Q8_0)
    hf_q = state["model.layers.0.self_attn.q_proj.weight"]
    head0 = hf_q[:16]
    # Q8_0 rounds each value to half a step of its block, a step being the block's max |value| / 127
    assert_close(stored_q[0:16:2], head0[:8], 1 / 127, what="even q rows")
    assert_close(stored_q[1:16:2], head0[8:16], 1 / 127, what="odd q rows")
    meta = gguf_read.read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 7
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.block_count"],
            meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (4, 2, 2, 64, 128)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.chat_template"] == source_tokenizer.chat_template
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert len(reader.fields["tokenizer.ggml.merges"].data) == 48900


def test_written_gguf_reads_in_transformers(tmp_path, source_tokenizer):
    """transformers' GGUF reader (an independent reader) gets the original model and tokenizer back."""
    from transformers import AutoModelForCausalLM

    from sftjax.models.weights import model_from_hf_tensors

    config, state = _random_llama(tied=False)
    model, model_config = model_from_hf_tensors(config, state.items(), source="test")
    path = gguf_write.write_gguf(model, model_config, source_tokenizer, tmp_path / "m.gguf", dtype="f32")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = theirs(torch.from_numpy(_TOKENS), use_cache=False).logits.numpy()
    assert_close(logits, _torch_logits(config, state, _TOKENS), 1e-5, what="logits")
    ours = gguf_read.load_gguf_tokenizer(path)  # transformers' GGUF tokenizer converter underneath
    for text in ["What is the capital of France?", "x = [1, 2]\n\n\tdone  ", "<|im_start|>user\nhé<|im_end|>"]:
        expected = source_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ours(text, add_special_tokens=False)["input_ids"] == expected
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        source_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_write_gguf_refuses_unexportable_configs_and_tokenizers(tmp_path, source_tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    config, state = _random_llama(tied=True)
    gpt2 = {**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(CheckpointError) as error:
        gguf_write.write_gguf_from_hf(gpt2, state.items(), source_tokenizer, tmp_path / "g.gguf")
    _assert_one_line(error, "GPT2LMHeadModel", "no GGUF export")
    with pytest.raises(CheckpointError) as error:
        gguf_write.write_gguf_from_hf(config, state.items(), source_tokenizer, tmp_path / "d.gguf", dtype="q4_0")
    _assert_one_line(error, "q4_0")
    word_level = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    with pytest.raises(CheckpointError) as error:
        gguf_write.write_gguf_from_hf(config, state.items(), word_level, tmp_path / "w.gguf")
    _assert_one_line(error, "WordLevel")
    assert not list(tmp_path.iterdir())


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError) as error:
        gguf_read.load_gguf_tokenizer(tmp_path / "absent.gguf")
    _assert_one_line(error, "absent.gguf")
    path = _write_raw_gguf(tmp_path / "no_vocab.gguf", _tiny_llama_tensors())
    with pytest.raises(CheckpointError) as error:
        gguf_read.load_gguf_tokenizer(path)
    _assert_one_line(error, str(path), "tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# Other architectures: a GGUF written the way llama.cpp's converter does (the gguf package's own HF -> GGUF name
# table; Gemma norms stored as 1 + w) from a random transformers model, read back and run through sftjax.

_OTHER_ARCHITECTURES = {
    "qwen2": ("QWEN2", {}),
    "qwen3": ("QWEN3", {}),
    "gemma2": ("GEMMA2", dict(tie_word_embeddings=True, attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                              sliding_window=4, query_pre_attn_scalar=8, hidden_activation="gelu_pytorch_tanh")),
    "phi3": ("PHI3", dict(num_key_value_heads=4, pad_token_id=0)),
}


def _random_transformers_model(model_type: str, extra: dict):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    settings = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5,
                    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config = CONFIG_MAPPING[model_type](**{**settings, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.3 if parameter.ndim > 1 else 0.2)
            if parameter.ndim == 1 and "norm" in name and model_type != "gemma2":
                parameter.add_(1.0)
    return model


def _write_like_llama_cpp(path, model_type: str, arch_name: str, model):
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_key_length(8)
    writer.add_value_length(8)
    writer.add_rope_dimension_count(8)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if model_type == "gemma2":
        writer.add_attn_logit_softcapping(20.0)
        writer.add_final_logit_softcapping(15.0)
        writer.add_sliding_window(4)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = value.numpy().astype(np.float32)
        if model_type == "gemma2" and name.endswith("norm.weight"):
            array = array + 1.0
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("model_type", sorted(_OTHER_ARCHITECTURES))
def test_other_architectures_read_back_exactly(tmp_path, model_type):
    import sftjax

    arch_name, extra = _OTHER_ARCHITECTURES[model_type]
    reference = _random_transformers_model(model_type, extra)
    path = _write_like_llama_cpp(tmp_path / "m.gguf", model_type, arch_name, reference)
    config, tensors = gguf_read.read_gguf_checkpoint(path)
    tensors = dict(tensors)
    expected = {k: v.numpy() for k, v in reference.state_dict().items()}
    if reference.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert set(tensors) == set(expected) and config["model_type"] == model_type
    for name, value in expected.items():
        assert_close(tensors[name], value, 1e-6, what=name)
    tokens = np.array([[1, 5, 9, 33, 7, 100, 3, 60, 2, 11]])
    with torch.no_grad():
        logits = reference(torch.from_numpy(tokens), use_cache=False).logits.numpy()
    model, _ = sftjax.load_model(path)
    assert_close(np.asarray(model(tokens)), logits, 1e-5, what="logits")


_PRE_TOKENIZER_TEXTS = ["The year 1234567 had 89 days; it's 3.14159!", "  indented\n\n\tcode(x)  \r\n",
                        "naïve 日本語 😀 ÀÉÎ", "I'LL don't WE'RE", "a\u00a0b   c\n \n"]


@pytest.mark.parametrize("name, pre", [("llama3/hf", "llama-bpe"), ("qwen2/hf", "qwen2"), ("smollm2", "gpt-2")])
def test_pre_tokenizer_names(assets_dir, name, pre):
    """llama.cpp's pre-tokenizer name is recognised from tokenizer.json and rebuilt to split text the same way."""
    import json

    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / name))
    assert gguf_tokenizer.tokenizer_pre(json.loads(source.backend_tokenizer.to_str())) == pre
    rebuilt = gguf_read._pre_tokenizer(pre)
    for text in _PRE_TOKENIZER_TEXTS:
        assert rebuilt.pre_tokenize_str(text) == source.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)


@pytest.mark.parametrize("name, pre", [("llama3/hf", "llama-bpe"), ("qwen2/hf", "qwen2")])
def test_tokenizer_roundtrip_through_gguf_metadata(tmp_path, assets_dir, name, pre):
    """Vocabulary/merges/pre-tokenizer written by write_gguf come back as the same tokenizer (llama.cpp's names)."""
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / name))
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_tokenizer.add_tokenizer(writer, source, len(source), path)
    writer.add_tensor("token_embd.weight", np.zeros((len(source), 1), np.float32))  # placeholder tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_read.read_gguf_metadata(path)["tokenizer.ggml.pre"] == pre
    ours = gguf_read.load_gguf_tokenizer(path)
    for text in _PRE_TOKENIZER_TEXTS + ["<|im_start|>user hi<|im_end|><|eot_id|>"]:
        assert ours(text, add_special_tokens=False)["input_ids"] == source(text, add_special_tokens=False)[
            "input_ids"], text
        assert ours(text)["input_ids"] == source(text)["input_ids"], text
        ids = source(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == source.decode(ids)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (source.bos_token_id, source.eos_token_id)


def test_gguf_tokenizer_needs_no_torch(smollm2_gguf):
    """The demo installs no PyTorch: reading the SmolLM2 tokenizer must not import it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from sftjax.models.gguf_read import load_gguf_tokenizer\n"
            f"tok = load_gguf_tokenizer({str(smollm2_gguf)!r})\n"
            "print(tok('What is the capital of France?')['input_ids'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[1780, 314, 260, 3575, 282, 4649, 47]"


def test_llama3_rope_scaling_roundtrip(tmp_path):
    """Llama-3.1-style RoPE travels as llama.cpp's rope_freqs tensor and is recognised again on reading."""
    import sftjax

    config, state = _random_llama(tied=True)
    config = {**config, "vocab_size": 128, "max_position_embeddings": 131072,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    config.pop("rope_theta")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:128]
    path = gguf_write.write_gguf_from_hf(config, state.items(), None, tmp_path / "l3.gguf", dtype="f32")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    read_config, tensors = gguf_read.read_gguf_checkpoint(path)
    assert read_config["rope_parameters"] == config["rope_parameters"]
    assert "rope_freqs.weight" not in dict(tensors)
    tokens = np.array([[1, 5, 9, 33, 7, 100, 3, 60, 2, 11]])
    expected = _torch_logits(config, state, tokens)
    default_rope = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    assert np.abs(_torch_logits(default_rope, state, tokens) - expected).max() > 1e-3  # the scaling matters here
    model, _ = sftjax.load_model(path)
    assert_close(np.asarray(model(tokens)), expected, 1e-5, what="logits")
