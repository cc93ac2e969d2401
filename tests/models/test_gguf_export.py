"""GGUF export of every family sftjax loads, checked by independent readers.

A tiny random model is built with transformers' own class, loaded into sftjax, exported with ``write_gguf`` (f32)
and read back three ways: the gguf package (architecture, llama.cpp's tensor names from gguf-py's own table, the
stored values in llama.cpp's layout), transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``, where it
knows the architecture) and sftjax's reader; logits are compared with the original torch model. Tokenizers: the
SentencePiece ones come back through transformers' GGUF tokenizer converter and encode text as the source does.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import require

gguf = require("gguf")
torch = require("torch")

from sftjax.errors import CheckpointError
from sftjax.models import gguf_read, gguf_write
from tests.oracle import assert_close

_BASE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# model_type -> (GGUF architecture, transformers can load it, config overrides). The head sizes follow what
# transformers' GGUF loader assumes where the file has no key for them (Qwen3's head_dim, Gemma 2's
# query_pre_attn_scalar and soft-capping defaults).
_FAMILIES = {
    "llama": ("llama", True, {}),
    "mistral": ("llama", True, {"sliding_window": None}),
    "qwen2": ("qwen2", True, {}),
    "qwen3": ("qwen3", True, {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128}),
    "gemma": ("gemma", False, {"tie_word_embeddings": True, "num_key_value_heads": 1,
                                   "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma2": ("gemma2", True, {"tie_word_embeddings": True, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4,
                                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                    "hidden_activation": "gelu_pytorch_tanh"}),
    "phi3": ("phi3", True, {"sliding_window": None}),
}
_TOKENS = np.array([[1, 5, 9, 33, 7, 100, 3, 60, 2, 11, 17, 90]])


def _torch_model(model_type: str, **extra):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[model_type](**{**_BASE, **_FAMILIES[model_type][2], **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.3 if parameter.ndim > 1 else 0.2)
            if parameter.ndim == 1 and "norm" in name and not model_type.startswith("gemma"):
                parameter.add_(1.0)
    return model


def _state(model) -> dict[str, np.ndarray]:
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _logits(model, tokens=_TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens), use_cache=False).logits.float().numpy()


def _export(reference, path, tokenizer=None):
    """Through sftjax: the HF checkpoint -> a Decoder -> write_gguf."""
    from sftjax.models.weights import model_from_hf_tensors

    model, config = model_from_hf_tensors(reference.config.to_dict(), _state(reference).items(), source="test")
    return gguf_write.write_gguf(model, config, tokenizer, path, dtype="f32")


def _expected_stored(model_type: str, arch: str, reference) -> dict[str, np.ndarray]:
    """llama.cpp's layout, computed here: gguf-py's name table, q/k rows interleaved per head for "llama",
    Gemma norms as 1 + w."""
    config = reference.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    expected = {}
    for name, value in _state(reference).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")) and arch == "llama":
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            half = value.shape[0] // heads // 2
            value = value.reshape(heads, 2, half, -1).transpose(0, 2, 1, 3).reshape(value.shape)
        if model_type.startswith("gemma") and name.endswith("norm.weight"):
            value = value + 1.0
        expected[names.get_name(name, try_suffixes=(".weight", ".bias"))] = value
    return expected


@pytest.mark.parametrize("model_type", sorted(_FAMILIES))
def test_family_exports_and_reads_back(tmp_path, model_type):
    import sftjax

    arch, transformers_reads, _ = _FAMILIES[model_type]
    reference = _torch_model(model_type)
    expected_logits = _logits(reference)
    path = _export(reference, tmp_path / "m.gguf")

    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == arch
    stored = {t.name: gguf_read._dequantize(t, path) for t in reader.tensors}
    expected = _expected_stored(model_type, arch, reference)
    assert set(stored) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
    meta = gguf_read.read_gguf_metadata(path)
    config = reference.config
    assert (meta[f"{arch}.block_count"], meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"],
            meta[f"{arch}.attention.head_count_kv"], meta[f"{arch}.feed_forward_length"]) == (
        2, 64, config.num_attention_heads, config.num_key_value_heads, 96)
    if model_type == "gemma2":
        assert (meta["gemma2.attn_logit_softcapping"], meta["gemma2.final_logit_softcapping"],
                meta["gemma2.attention.sliding_window"]) == (50.0, 30.0, 4)
    if model_type in ("qwen3", "gemma", "gemma2"):
        assert meta[f"{arch}.attention.key_length"] == config.head_dim

    if transformers_reads:
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
        assert_close(_logits(theirs.eval()), expected_logits, 1e-5, what="transformers GGUF loader logits")
    model, model_config = sftjax.load_model(path)
    assert model_config.family == ("mistral" if model_type == "mistral" and config.sliding_window else
                                   "llama" if model_type == "mistral" else model_type)
    assert_close(np.asarray(model(_TOKENS)), expected_logits, 2e-5, what="sftjax reader logits")


def test_mistral_sliding_window_roundtrip(tmp_path):
    """Mistral goes out as llama.cpp's "llama" with the window key, and the window comes back as Mistral's."""
    import sftjax

    reference = _torch_model("mistral", sliding_window=4)
    path = _export(reference, tmp_path / "m.gguf")
    meta = gguf_read.read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.attention.sliding_window"] == 4
    model, config = sftjax.load_model(path)
    assert config.family == "mistral" and config.sliding_window == 4
    expected = _logits(reference)
    assert np.abs(_logits(_torch_model("mistral")) - expected).max() > 1e-3  # the window matters here
    assert_close(np.asarray(model(_TOKENS)), expected, 2e-5, what="logits")


def test_phi3_longrope_factor_tensors(tmp_path):
    """Phi-3 longrope travels as llama.cpp's rope_factors_long/short tensors plus the original context length."""
    import sftjax

    rng = np.random.default_rng(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "long_factor": [float(x) for x in rng.uniform(1.0, 4.0, 8)],
            "short_factor": [float(x) for x in rng.uniform(1.0, 2.0, 8)]}
    reference = _torch_model("phi3", rope_parameters=rope, original_max_position_embeddings=32,
                             max_position_embeddings=128)
    path = _export(reference, tmp_path / "p.gguf")
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    np.testing.assert_array_equal(stored["rope_factors_long.weight"], np.float32(rope["long_factor"]))
    np.testing.assert_array_equal(stored["rope_factors_short.weight"], np.float32(rope["short_factor"]))
    meta = gguf_read.read_gguf_metadata(path)
    assert meta["phi3.rope.scaling.original_context_length"] == 32
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(32)), rel=1e-6)
    model, config = sftjax.load_model(path)
    assert config.rope_type == "longrope"
    expected = _logits(reference)
    plain = _torch_model("phi3", max_position_embeddings=128)
    assert np.abs(_logits(plain) - expected).max() > 1e-3  # the factors matter here
    assert_close(np.asarray(model(_TOKENS)), expected, 2e-5, what="logits")


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece tokenizers

_TEXTS = ["What is the capital of France?", "Hello world", "naïve café — 日本語 😀 x=1+2;\n    return a**2",
          "The year 1234567 had 89 days; it's 3.14!", "tabs\tand\nnewlines\n\nend", "</s> and <s> inside"]


@pytest.fixture(params=["llama2/tokenizer.model", "mistral/tokenizer.model.v1"])
def sentencepiece_tokenizer(request, assets_dir, tmp_path_factory):
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("spm")
    shutil.copy(assets_dir / "tokenizers" / request.param, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)  # as Llama-2's tokenizer_config
    assert len(tokenizer) == 32000 and tokenizer.vocab_file and tokenizer("a")["input_ids"][0] == 1
    return tokenizer


def _transformers_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same_encoding(ours, source, texts=tuple(_TEXTS)):
    for text in texts:
        assert ours(text, add_special_tokens=False)["input_ids"] == source(text, add_special_tokens=False)[
            "input_ids"], text
        assert ours(text)["input_ids"] == source(text)["input_ids"], text
        ids = source(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == source.decode(ids), text


def test_sentencepiece_llama_tokenizer(tmp_path, sentencepiece_tokenizer):
    """Llama-2/TinyLlama/Mistral vocabularies as llama.cpp writes them: the SentencePiece model's pieces, scores
    and types; transformers' GGUF converter rebuilds a tokenizer that encodes like the source."""
    import sentencepiece

    source = sentencepiece_tokenizer
    reference = _torch_model("llama", vocab_size=32000)
    path = _export(reference, tmp_path / "tl.gguf", source)
    reader = gguf.GGUFReader(str(path))
    meta = gguf_read.read_gguf_metadata(path)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is True
    processor = sentencepiece.SentencePieceProcessor(model_file=source.vocab_file)
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    for index in (3, 100, 259, 500, 31999):
        assert tokens[index] == processor.IdToPiece(index)
        assert scores[index] == pytest.approx(processor.GetScore(index))
    assert types[3 + 0x41] == gguf.TokenType.BYTE and types[500] == gguf.TokenType.NORMAL
    assert types[1] == gguf.TokenType.CONTROL  # <s>: a special added token, as llama.cpp's converter marks it
    # The stored scores are SentencePiece's, so the file encodes like SentencePiece (and llama.cpp) everywhere,
    # and like transformers' BPE rendition of it except on runs of spaces, where that one differs from both.
    theirs = _transformers_gguf_tokenizer(path)
    for text in _TEXTS[:-1]:  # (SentencePiece itself knows no special tokens in text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == processor.encode(text), text
    no_space_runs = [text for text in _TEXTS if "  " not in text]
    assert len(no_space_runs) == len(_TEXTS) - 1
    _assert_same_encoding(theirs, source, no_space_runs)
    _assert_same_encoding(gguf_read.load_gguf_tokenizer(path), source, no_space_runs)


def test_sentencepiece_scores_from_merges(tmp_path, sentencepiece_tokenizer):
    """Without the tokenizer.model file, the scores come from tokenizer.json's merge order and still rebuild it."""
    from transformers import PreTrainedTokenizerFast

    source = sentencepiece_tokenizer
    no_model_file = PreTrainedTokenizerFast(tokenizer_object=source.backend_tokenizer, bos_token="<s>",
                                            eos_token="</s>", unk_token="<unk>")
    assert getattr(no_model_file, "vocab_file", None) is None
    path = _export(_torch_model("llama", vocab_size=32000), tmp_path / "m.gguf", no_model_file)
    scores = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.scores"].contents()
    normal = [scores[i] for i in range(259, 32000)]
    assert len(set(normal)) > 25000  # one rank per merged piece
    _assert_same_encoding(_transformers_gguf_tokenizer(path), source)


# ---------------------------------------------------------------------------------------------------------------
# What cannot be exported: one line, and no file


def _hf(model_type: str, **extra) -> dict:
    reference = _torch_model(model_type)
    return {**reference.config.to_dict(), **extra}, _state(reference)


@pytest.mark.parametrize("model_type, extra, expected", [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, "dynamic"),
    ("llama", {"mlp_bias": True}, "MLP biases"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "sliding window"),
    ("gemma", {"tie_word_embeddings": False}, "untied"),
    ("gemma2", {"query_pre_attn_scalar": 100}, "query_pre_attn_scalar"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]}, "every other layer"),
    ("phi3", {"partial_rotary_factor": 0.5, "hidden_act": "gelu"}, "activation"),
    ("qwen3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0] * 8,
                                   "short_factor": [1.0] * 8, "original_max_position_embeddings": 32,
                                   "attention_factor": 3.0}}, "attention_factor"),
])
def test_unexportable_configs_say_so_before_writing(tmp_path, model_type, extra, expected):
    config, state = _hf(model_type, **extra)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as error:
        gguf_write.write_gguf_from_hf(config, state.items(), None, out / "m.gguf")
    message = str(error.value)
    assert "\n" not in message and expected in message and "GGUF" in message, message
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("architecture", ["Gemma3ForCausalLM", "Gemma4ForCausalLM"])
def test_gemma3_and_gemma4_have_no_gguf_export(architecture):
    """Their per-layer-type RoPE and head shapes have no writer here: refused in one line before any file."""
    from sftjax.models.registry import config_from_hf

    hf = dict(architectures=[architecture], vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    if architecture == "Gemma4ForCausalLM":
        hf["hidden_size_per_layer_input"] = 0
    config = config_from_hf(hf)
    with pytest.raises(CheckpointError, match=rf"^write_gguf: {architecture} has no GGUF export \(supported: "):
        gguf_write.check_exportable(config.to_hf_dict())
