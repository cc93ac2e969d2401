"""Writing GGUF files llama.cpp can run: HF names -> GGUF names, the q/k permutation re-applied, the metadata keys
llama.cpp reads, and the tokenizer's vocabulary, merges, special ids and chat template.

Every problem is a one-line :class:`~sftjax.errors.CheckpointError` raised before anything is written.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable

import numpy as np

from sftjax.errors import CheckpointError
from sftjax.models.gguf_read import (_LLAMA3_SPLIT, _QWEN2_SPLIT, _BLOCK_NAMES, _GLOBAL_NAMES, _rope_rows_to_ggml)
from sftjax.models.weights import iter_hf_tensors


_WRITE_DTYPES = ("f32", "f16", "bf16", "q8_0")


def _gguf_name(hf_name: str) -> str:
    """GGUF tensor name for a Llama HF parameter name (the inverse of :func:`_hf_name`)."""
    for gguf_prefix, hf_prefix in _GLOBAL_NAMES.items():
        if hf_name.startswith(hf_prefix + ".") and hf_name.count(".") == hf_prefix.count(".") + 1:
            return f"{gguf_prefix}.{hf_name.rsplit('.', 1)[1]}"
    match = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf_name)
    if match:
        layer, part, kind = match.groups()
        for gguf_part, hf_part in _BLOCK_NAMES.items():
            if hf_part == part and gguf_part != "attn_qkv":
                return f"blk.{layer}.{gguf_part}.{kind}"
    raise CheckpointError(f"write_gguf: tensor {hf_name} has no GGUF name for the llama architecture")


def _tokenizer_pre(backend: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer ("default" when not recognised)."""
    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    for step in pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []:
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    return "default"


def _add_tokenizer(writer, tokenizer, vocab_size: int, out_path: pathlib.Path, tokenizer_pre: str | None) -> None:
    """Vocabulary, merges, token types, special ids and chat template of a byte-level BPE tokenizer."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model") or {}
    pre = backend.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" or any(
        step.get("type") == "ByteLevel" for step in pre.get("pretokenizers", []))
    if model.get("type") != "BPE" or not byte_level:
        raise CheckpointError(f"{out_path}: write_gguf supports byte-level BPE tokenizers (GPT-2/Llama-3/Qwen style); "
                              f"this one is {model.get('type', type(tokenizer).__name__)} with pre-tokenizer "
                              f"{pre.get('type')}")
    id_to_token = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(id_to_token) >= vocab_size:
        raise CheckpointError(f"{out_path}: tokenizer has token id {max(id_to_token)} but the model's vocabulary "
                              f"has {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in id_to_token:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(id_to_token[index])
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre or _tokenizer_pre(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    probe_with, probe_without = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe_with[:1] == [tokenizer.bos_token_id]
                                  and probe_without[:1] != [tokenizer.bos_token_id]))
    writer.add_add_eos_token(bool(tokenizer.eos_token_id is not None and probe_with[-1:] == [tokenizer.eos_token_id]
                                  and probe_without[-1:] != [tokenizer.eos_token_id]))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _encode_tensor(array: np.ndarray, dtype: str):
    """(data, raw ggml type or None) as GGUFWriter wants it; 1-D tensors stay float32 (llama.cpp's convention)."""
    import gguf

    if array.ndim == 1 or dtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), gguf.GGMLQuantizationType.BF16), \
            gguf.GGMLQuantizationType.BF16
    return np.ascontiguousarray(array, dtype=np.float16), None  # f16, and q8_0 rows not a multiple of 32


def write_gguf_from_hf(hf_config: dict, tensors: Iterable[tuple[str, np.ndarray]], tokenizer, out_path, *,
                       dtype: str = "f16", tokenizer_pre: str | None = None, name: str | None = None) -> pathlib.Path:
    """Write a llama.cpp-compatible GGUF from a Llama ``config.json`` dict and HF-named [out, in] tensors."""
    import gguf

    out_path = pathlib.Path(out_path)
    if dtype not in _WRITE_DTYPES:
        raise CheckpointError(f"write_gguf: dtype '{dtype}' is not one of {', '.join(_WRITE_DTYPES)}")
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type != "llama" or any(arch != "LlamaForCausalLM" for arch in architectures):
        raise CheckpointError(f"{out_path}: write_gguf supports the Llama architecture only, not "
                              f"{', '.join(architectures) or model_type}")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise CheckpointError(f"{out_path}: write_gguf: Llama with attention/MLP biases is not supported")
    hidden = int(hf_config["hidden_size"])
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = int(hf_config.get("head_dim") or hidden // heads)
    vocab = int(hf_config["vocab_size"])
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{out_path}: write_gguf: RoPE type '{rope_type}' is not supported")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or out_path.stem)
    writer.add_context_length(int(hf_config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(hf_config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(hf_config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(hf_config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(int(file_types[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, vocab, out_path, tokenizer_pre)

    if rope_type == "llama3":
        inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelength = 2 * np.pi / inv_freq
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        original = float(rope["original_max_position_embeddings"])
        smooth = (original / wavelength - low) / (high - low)
        factors = np.where(wavelength < original / high, 1.0,
                           np.where(wavelength > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    seen = set()
    for hf_name, array in tensors:
        if hf_name == "lm_head.weight" and hf_config.get("tie_word_embeddings"):
            continue
        gguf_name = _gguf_name(hf_name)
        if hf_name.endswith("q_proj.weight"):
            array = _rope_rows_to_ggml(np.asarray(array), heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _rope_rows_to_ggml(np.asarray(array), kv_heads)
        data, raw_type = _encode_tensor(np.asarray(array, dtype=np.float32), dtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
        seen.add(gguf_name)
    if "token_embd.weight" not in seen:
        raise CheckpointError(f"{out_path}: write_gguf: no model.embed_tokens.weight among the tensors")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out_path)  # a crash never leaves a half-written file under the final name
    return out_path


def write_gguf(model, config, tokenizer, out_path, *, dtype: str = "f16", tokenizer_pre: str | None = None,
               name: str | None = None) -> pathlib.Path:
    """Export a Llama-architecture Decoder (LoRA merged) with its tokenizer to a GGUF file llama.cpp can run.

    ``dtype``: "f16" (default), "bf16", "q8_0" or "f32"; norms stay float32. ``config`` is the model's
    ModelConfig. The tokenizer must be byte-level BPE (``tokenizer=None`` writes none).
    """
    hf_config = config.to_hf_dict()
    return write_gguf_from_hf(hf_config, iter_hf_tensors(model, config, dtype=np.float32), tokenizer, out_path,
                              dtype=dtype, tokenizer_pre=tokenizer_pre, name=name)
