"""Reading GGUF checkpoints (and the name tables the writer shares).

Reading: the ``gguf`` package's ``GGUFReader`` memory-maps the file; we turn its metadata into the ``config.json``
dict that ``transformers`` would use for the same model, and yield its tensors one at a time, dequantized to float32
and renamed to Hugging Face names and layout ([out, in] for linear weights). Two things llama.cpp's converter does
to the weights are undone here:

* for the ``llama`` architecture it permutes the rows of q_proj and k_proj, from HF's "rotate half" RoPE layout
  (each head's first half / second half are the pairs) to GGML's interleaved layout (pairs are adjacent rows);
* for Gemma models it stores RMSNorm weights as ``1 + w`` (GGML multiplies by the weight; Gemma by ``1 + w``).

Mixture-of-experts files (Mixtral, written as ``llama`` with an ``expert_count``; Qwen3-MoE as ``qwen3moe``)
hold each projection of all experts stacked in one tensor (``blk.N.ffn_gate_exps`` [experts, out, in]); they are
split into the per-expert tensors of the Hugging Face files (``...experts.{e}.gate_proj.weight``). llama.cpp's
Qwen3-MoE always renormalizes the top-k routing weights, so ``norm_topk_prob`` is true.

Writing is the inverse and lives in :mod:`sftjax.models.gguf_write`. This module imports no jax.

Every problem with a file is a one-line :class:`~sftjax.errors.CheckpointError` naming the file (and tensor).
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from sftjax.errors import CheckpointError

# --------------------------------------------------------------------------------------------------------------
# Quantization types we read. Each one is checked against an independent reference in tests/models/test_gguf_io.py.

_SUPPORTED_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF architecture -> (HF model_type, HF architectures entry).
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# MoE block tensors: GGUF suffix -> HF name inside ``model.layers.{i}.``, per architecture; ``{e}`` marks a
# stacked tensor split into one HF tensor per expert.
_MOE_BLOCK_NAMES = {
    "qwen3moe": {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
                 "ffn_up_exps": "mlp.experts.{e}.up_proj", "ffn_down_exps": "mlp.experts.{e}.down_proj"},
    "mixtral": {"ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
                "ffn_up_exps": "block_sparse_moe.experts.{e}.w3", "ffn_down_exps": "block_sparse_moe.experts.{e}.w2"},
}
# Architectures whose q/k rows llama.cpp permutes into its interleaved RoPE layout.
_PERMUTED_QK_ARCHITECTURES = {"llama", "mistral"}
_GEMMA_ARCHITECTURES = {"gemma", "gemma2"}

# GGUF block tensor suffix -> HF suffix inside ``model.layers.{i}.``. Gemma 2's four norms are mapped separately.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA2_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_BLOCK_NAMES = {**_BLOCK_NAMES, "ffn_up": "mlp.gate_up_proj"}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Pre-tokenizer regexes of llama.cpp's known BPE pre-tokenizers, shared with the writer.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# RoPE frequency tensors: read into the config, not weights.
_ROPE_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _open_reader(path: pathlib.Path):
    """A GGUFReader (memory-mapped). Parsing a large vocabulary's metadata takes seconds, so the last two files
    are kept open: ``load_model`` and ``load_tokenizer`` on one file parse it once."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    stat = path.stat()
    try:
        return _cached_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except Exception as error:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file, corrupt or truncated ({_one_line(error)})") from error


@functools.lru_cache(maxsize=2)
def _cached_reader(resolved_path: str, mtime_ns: int, size: int):
    import gguf

    return gguf.GGUFReader(resolved_path, "r")


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return default if value is None else value


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata key/values of a GGUF file except the (large) tokenizer arrays, for inspection and tests."""
    reader = _open_reader(pathlib.Path(path))
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    return {key: _field(reader, key) for key in reader.fields if key not in skip and not key.startswith("GGUF.")}


# --------------------------------------------------------------------------------------------------------------
# Reading


def _hf_config(reader, path: pathlib.Path, tensor_names: set[str]) -> dict[str, Any]:
    """The transformers ``config.json`` dict for the model described by the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise CheckpointError(f"{path}: GGUF architecture '{arch}' is not supported (supported: {known})")
    model_type, hf_class = _ARCHITECTURES[arch]

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata key '{arch}.{key}' is missing")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    if vocab is None:
        embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(embedding.shape[1])
    rope_theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{gguf_key}")  # absent: None, not a config class's default
        config[hf_key] = None if value is None else int(value)
    _add_rope_scaling(reader, arch, config, path)
    sliding_window = _field(reader, f"{arch}.attention.sliding_window")
    if arch in _GEMMA_ARCHITECTURES:
        config["hidden_act"] = config["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "gemma2":
        config["attn_logit_softcapping"] = _field(reader, f"{arch}.attn_logit_softcapping")
        config["final_logit_softcapping"] = _field(reader, f"{arch}.final_logit_softcapping")
        config["query_pre_attn_scalar"] = head_dim
        config["sliding_window"] = int(sliding_window or 4096)
    elif sliding_window:
        config["sliding_window"] = int(sliding_window)
        if arch == "llama":  # llama.cpp writes Mistral as "llama"; the window is what tells them apart
            config["model_type"], config["architectures"] = "mistral", ["MistralForCausalLM"]
    if arch in ("qwen2",):
        config["use_sliding_window"] = False
    experts = _field(reader, f"{arch}.expert_count")
    if experts:
        _add_moe(reader, arch, config, path, int(experts))
    if arch == "phi3":
        rotary = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
        config["partial_rotary_factor"] = rotary / head_dim
        config["rope_parameters"]["partial_rotary_factor"] = rotary / head_dim
    return config


def _add_moe(reader, arch: str, config: dict, path: pathlib.Path, experts: int) -> None:
    used = _field(reader, f"{arch}.expert_used_count")
    if used is None:
        raise CheckpointError(f"{path}: GGUF metadata key '{arch}.expert_used_count' is missing")
    shared = int(_field(reader, f"{arch}.expert_shared_count", 0) or 0)
    if shared:
        raise CheckpointError(f"{path}: '{arch}.expert_shared_count'={shared}: shared experts are not supported in "
                              "GGUF files")
    if arch == "llama":  # Mixtral
        config.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=experts,
                      num_experts_per_tok=int(used))
    elif arch == "qwen3moe":
        width = _field(reader, f"{arch}.expert_feed_forward_length")
        if width is None:
            raise CheckpointError(f"{path}: GGUF metadata key '{arch}.expert_feed_forward_length' is missing")
        config.update(num_experts=experts, num_experts_per_tok=int(used), moe_intermediate_size=int(width),
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        raise CheckpointError(f"{path}: GGUF architecture '{arch}' with experts is not supported "
                              "(supported: llama (Mixtral), qwen3moe)")


def _moe_table(arch: str, config: dict) -> dict | None:
    if config.get("model_type") == "mixtral":
        return _MOE_BLOCK_NAMES["mixtral"]
    return _MOE_BLOCK_NAMES.get(arch)


def _add_rope_scaling(reader, arch: str, config: dict, path: pathlib.Path) -> None:
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling in (None, "none"):
        return
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if scaling == "linear":
        config["rope_parameters"].update(rope_type="linear", factor=factor)
    elif scaling == "yarn":
        original_key = f"{arch}.rope.scaling.original_context_length"
        original = int(_field(reader, original_key, config["max_position_embeddings"]))
        config["rope_parameters"].update(rope_type="yarn", factor=factor, original_max_position_embeddings=original)
    else:
        raise CheckpointError(f"{path}: RoPE scaling type '{scaling}' in '{arch}.rope.scaling.type' is not supported")
    config["rope_scaling"] = dict(config["rope_parameters"])


def _llama3_rope_parameters(freq_factors: np.ndarray, config: dict) -> dict | None:
    """Recognise the frequency factors llama.cpp stores for Llama-3.1/3.2 ("llama3" RoPE) and return HF's form."""
    head_dim, theta = config["head_dim"], config["rope_theta"]
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * np.pi / inv_freq
    original, low, high = 8192, 1.0, 4.0
    for factor in (8.0, 32.0, 16.0, 4.0):
        smooth = (original / wavelength - low) / (high - low)
        expected = np.where(
            wavelength < original / high, 1.0,
            np.where(wavelength > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expected.shape == freq_factors.shape and np.allclose(expected, freq_factors, rtol=1e-4):
            return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}
    return None


def _hf_name(gguf_name: str, arch: str, moe_table: dict | None = None) -> str | None:
    """HF parameter name for a GGUF tensor name, or None when it has no HF counterpart (``{e}`` in it: one HF
    tensor per expert)."""
    match = _BLOCK_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        table = {"gemma2": _GEMMA2_BLOCK_NAMES, "phi3": _PHI3_BLOCK_NAMES}.get(arch, _BLOCK_NAMES)
        if moe_table:
            table = {**table, **moe_table}
        hf_part = table.get(part)
        return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{kind}"
    match = _GLOBAL_RE.match(gguf_name)
    if match and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    return None


def _rope_rows_from_ggml(rows_OI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, interleaved (x0,y0,x1,y1..) rows -> halves (x0,x1..,y0,y1..)."""
    out_dim = rows_OI.shape[0]
    head_dim = out_dim // n_heads
    return (rows_OI.reshape(n_heads, head_dim // 2, 2, *rows_OI.shape[1:])
            .swapaxes(1, 2).reshape(rows_OI.shape))


def _rope_rows_to_ggml(rows_OI: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (the inverse of :func:`_rope_rows_from_ggml`)."""
    out_dim = rows_OI.shape[0]
    head_dim = out_dim // n_heads
    return (rows_OI.reshape(n_heads, 2, head_dim // 2, *rows_OI.shape[1:])
            .swapaxes(1, 2).reshape(rows_OI.shape))


def _dequantize(tensor, path: pathlib.Path) -> np.ndarray:
    """A reader tensor as float32 in numpy order (GGUF lists dims innermost first; numpy outermost first)."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    kind = tensor.tensor_type
    try:
        if kind == gguf.GGMLQuantizationType.F32:
            array = np.array(tensor.data, dtype=np.float32)
        elif kind == gguf.GGMLQuantizationType.F16:
            array = np.asarray(tensor.data, dtype=np.float16).astype(np.float32)
        else:
            array = gguf.quants.dequantize(tensor.data, kind).astype(np.float32, copy=False)
        return array.reshape(shape)
    except Exception as error:
        raise CheckpointError(
            f"{path}: tensor '{tensor.name}' ({kind.name}) could not be decoded ({_one_line(error)})") from error


def read_gguf_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """(HF config dict, iterator of (HF name, float32 array in HF layout)) for a GGUF file.

    The file is memory-mapped and each tensor is dequantized only when the iterator reaches it, so peak host memory
    is one float32 tensor. Names/types are validated up front, so a bad file fails before any weight is loaded.
    """
    import gguf

    path = pathlib.Path(path)
    reader = _open_reader(path)
    supported = {getattr(gguf.GGMLQuantizationType, name) for name in _SUPPORTED_TYPE_NAMES}
    tensor_names = {t.name for t in reader.tensors}
    config = _hf_config(reader, path, tensor_names)
    arch = _field(reader, "general.architecture")
    moe_table = _moe_table(arch, config)
    expected_bytes = 0
    for tensor in reader.tensors:
        if tensor.tensor_type not in supported:
            raise CheckpointError(
                f"{path}: tensor '{tensor.name}' has quantization type {tensor.tensor_type.name}, which sftjax "
                f"does not read (supported: {', '.join(_SUPPORTED_TYPE_NAMES)})")
        if tensor.name not in _ROPE_TENSORS and _hf_name(tensor.name, arch, moe_table) is None:
            raise CheckpointError(f"{path}: tensor '{tensor.name}' has no Hugging Face counterpart for '{arch}'")
        expected_bytes = max(expected_bytes, int(tensor.data_offset) + int(tensor.n_bytes))
    if expected_bytes > path.stat().st_size:
        raise CheckpointError(f"{path}: file is truncated ({path.stat().st_size} bytes, tensors need {expected_bytes})")
    if "rope_factors_long.weight" in tensor_names and arch == "phi3":
        long, short = (_dequantize(next(t for t in reader.tensors if t.name == f"rope_factors_{kind}.weight"), path)
                       for kind in ("long", "short"))
        original = int(_field(reader, f"{arch}.rope.scaling.original_context_length",
                              config["max_position_embeddings"]))
        config["rope_parameters"].update(rope_type="longrope", long_factor=[float(x) for x in long],
                                         short_factor=[float(x) for x in short],
                                         original_max_position_embeddings=original)
        config["rope_scaling"] = dict(config["rope_parameters"])
        config["original_max_position_embeddings"] = original
    if "rope_freqs.weight" in tensor_names:
        freq_tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope = _llama3_rope_parameters(_dequantize(freq_tensor, path).astype(np.float64), config)
        if rope is None:
            raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' holds RoPE frequency factors sftjax cannot map")
        config["rope_parameters"] = rope
        config["rope_scaling"] = dict(rope)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for tensor in reader.tensors:
            if tensor.name in _ROPE_TENSORS:
                continue
            name = _hf_name(tensor.name, arch, moe_table)
            array = _dequantize(tensor, path)
            if "{e}" in name:  # a stacked [experts, out, in] tensor: one HF tensor per expert
                for expert in range(array.shape[0]):
                    yield name.format(e=expert), np.ascontiguousarray(array[expert])
                continue
            if arch in _PERMUTED_QK_ARCHITECTURES and name.endswith(("q_proj.weight", "q_proj.bias")):
                array = _rope_rows_from_ggml(array, config["num_attention_heads"])
            elif arch in _PERMUTED_QK_ARCHITECTURES and name.endswith(("k_proj.weight", "k_proj.bias")):
                array = _rope_rows_from_ggml(array, config["num_key_value_heads"])
            if arch in _GEMMA_ARCHITECTURES and "norm" in name:
                array = array - 1.0
            yield name, array

    return config, tensors()


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer(pre: str):
    """The tokenizers pre-tokenizer for llama.cpp's pre-tokenizer name of a byte-level BPE vocabulary."""
    from tokenizers import Regex, pre_tokenizers

    regex = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if regex is None:  # "gpt-2", "smollm", "default", ...: GPT-2's own regex inside ByteLevel
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_bpe_tokenizer(reader, path: pathlib.Path):
    """A PreTrainedTokenizerFast for a "gpt2" (byte-level BPE) GGUF vocabulary, built with ``tokenizers``.

    (transformers' own GGUF converter needs PyTorch, which sftjax does not depend on.)
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tokens = [str(token) for token in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens)))
    merges = [tuple(str(merge).split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges", [])]
    pre = str(_field(reader, "tokenizer.ggml.pre", "default"))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        duplicated = next(token for index, token in enumerate(tokens) if vocab[token] != index)
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens lists '{duplicated}' twice")
    model = models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False,
                       ignore_merges=pre in ("llama-bpe", "llama3", "qwen2"))
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(tokens[i], special=types[i] == gguf.TokenType.CONTROL, normalized=False)
                          for i in range(len(tokens))
                          if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)])

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos, add_eos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)), bool(
        _field(reader, "tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        single = " ".join(([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + (
            [f"{eos}:0"] if add_eos and eos else []))
        specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"), chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False)


def load_gguf_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer built from the GGUF's embedded vocabulary, merges, special ids and chat template.

    Byte-level BPE vocabularies ("gpt2": SmolLM2, Llama 3, Qwen2, ...) are built here with ``tokenizers``; others
    (SentencePiece "llama", ...) go through transformers' GGUF converter, which needs PyTorch.
    """
    path = pathlib.Path(path)
    reader = _open_reader(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise CheckpointError(f"{path}: GGUF file has no embedded tokenizer (key 'tokenizer.ggml.tokens' missing)")
    kind = _field(reader, "tokenizer.ggml.model")
    try:
        if kind == "gpt2":
            tokenizer = _byte_level_bpe_tokenizer(reader, path)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            template = _field(reader, "tokenizer.chat_template")
            if template and not getattr(tokenizer, "chat_template", None):
                tokenizer.chat_template = template
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"{path}: cannot build a '{kind}' tokenizer from the GGUF ({_one_line(error)})") from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
