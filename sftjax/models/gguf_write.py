"""Writing GGUF files llama.cpp can run, for the families llama.cpp runs: HF names -> GGUF names (gguf-py's tables),
the q/k permutation re-applied for the llama architecture, Gemma's norms stored as 1 + w, the metadata keys
llama.cpp reads for each architecture, and the tokenizer (:mod:`sftjax.models.gguf_tokenizer`).

Every problem is a one-line :class:`~sftjax.errors.CheckpointError` raised before anything is written.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from collections.abc import Iterable

import numpy as np

from sftjax.errors import CheckpointError
from sftjax.models.gguf_read import _rope_rows_to_ggml
from sftjax.models.gguf_tokenizer import add_tokenizer, tokenizer_kind
from sftjax.models.weights import iter_hf_tensors

_WRITE_DTYPES = ("f32", "f16", "bf16", "q8_0")

# HF model_type -> (gguf.MODEL_ARCH member, HF architectures entry, HF activation, RoPE types llama.cpp can run).
# Mistral is llama.cpp's "llama" architecture (as its converter writes it); Gemma's GELU is the tanh one.
_FAMILIES = {
    "llama": ("LLAMA", "LlamaForCausalLM", "silu", ("default", "linear", "llama3")),
    "mistral": ("LLAMA", "MistralForCausalLM", "silu", ("default", "linear", "llama3")),
    "qwen2": ("QWEN2", "Qwen2ForCausalLM", "silu", ("default", "linear")),
    "qwen3": ("QWEN3", "Qwen3ForCausalLM", "silu", ("default", "linear")),
    "gemma": ("GEMMA", "GemmaForCausalLM", "gelu_pytorch_tanh", ("default", "linear")),
    "gemma2": ("GEMMA2", "Gemma2ForCausalLM", "gelu_pytorch_tanh", ("default", "linear")),
    "phi3": ("PHI3", "Phi3ForCausalLM", "silu", ("default", "linear", "longrope")),
    # mixtures of experts: Mixtral is llama.cpp's "llama" with experts, Qwen3-MoE its "qwen3moe"
    "mixtral": ("LLAMA", "MixtralForCausalLM", "silu", ("default", "linear", "llama3")),
    "qwen3_moe": ("QWEN3MOE", "Qwen3MoeForCausalLM", "silu", ("default", "linear")),
}
_MOE = ("mixtral", "qwen3_moe")
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def _rope(hf_config: dict) -> dict:
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def check_exportable(hf_config: dict, where="write_gguf") -> str:
    """The GGUF architecture name for a ``config.json`` dict, or a one-line CheckpointError saying why llama.cpp's
    architecture for the family cannot run it (raised before anything is written)."""
    import gguf

    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type not in _FAMILIES:
        raise CheckpointError(f"{where}: {', '.join(architectures) or model_type} has no GGUF export "
                              f"(supported: {', '.join(_FAMILIES)})")
    arch_member, hf_class, activation, rope_types = _FAMILIES[model_type]
    if any(arch != hf_class for arch in architectures):
        raise CheckpointError(f"{where}: model_type '{model_type}' with architectures {architectures}: "
                              f"expected {hf_class}")

    def refuse(what: str):
        raise CheckpointError(f"{where}: cannot export {hf_class} to GGUF: {what}")

    act = hf_config.get("hidden_activation") or hf_config.get("hidden_act") or activation
    if act != activation and not (activation in _TANH_GELU and act in _TANH_GELU):
        refuse(f"activation '{act}' (llama.cpp's {model_type} uses {activation})")
    rope = _rope(hf_config)
    if rope["rope_type"] not in rope_types:
        refuse(f"RoPE type '{rope['rope_type']}' (llama.cpp runs {', '.join(rope_types)} for this family)")
    partial = float(rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0 and model_type != "phi3":
        refuse(f"partial_rotary_factor {partial}")
    if hf_config.get("mlp_bias"):
        refuse("MLP biases")
    if hf_config.get("attention_bias") and model_type not in ("llama",):
        refuse("attention biases")
    max_positions = int(hf_config.get("max_position_embeddings", 2048))
    window = hf_config.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and hf_config.get("use_sliding_window") and window \
            and int(window) < max_positions:
        refuse(f"a sliding window ({window}) on some layers")
    if model_type == "mixtral" and window and int(window) < max_positions:
        refuse(f"a sliding window ({window}) (llama.cpp's llama architecture runs full attention)")
    if model_type == "qwen3_moe":  # llama.cpp's qwen3moe: every layer routed, the top-k weights renormalized
        if hf_config.get("norm_topk_prob") is False:
            refuse("norm_topk_prob=false (llama.cpp's qwen3moe always renormalizes the top-k weights)")
        if hf_config.get("mlp_only_layers") or int(hf_config.get("decoder_sparse_step") or 1) != 1:
            refuse("dense layers among the MoE layers (mlp_only_layers, decoder_sparse_step)")
    if model_type in ("gemma", "gemma2") and hf_config.get("tie_word_embeddings") is False:
        refuse("an lm_head untied from the embeddings (llama.cpp's Gemma always ties them)")
    if model_type == "gemma2":
        layers = int(hf_config["num_hidden_layers"])
        layer_types = list(hf_config.get("layer_types") or [])
        alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        if layer_types and layer_types != alternating and set(layer_types) != {"full_attention"}:
            refuse("sliding-window layers other than every other layer from layer 0")
        heads = int(hf_config["num_attention_heads"])
        head_dim = int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // heads)
        scalar = float(hf_config.get("query_pre_attn_scalar") or head_dim)
        big = layers == 46 and scalar == int(hf_config["hidden_size"]) // heads  # llama.cpp's Gemma-2 27B rule
        if scalar != head_dim and not big:
            refuse(f"query_pre_attn_scalar {scalar} (llama.cpp scales queries by head_dim {head_dim} ** -0.5)")
    if model_type == "phi3" and rope["rope_type"] == "longrope":
        original = int(rope.get("original_max_position_embeddings")
                       or hf_config.get("original_max_position_embeddings") or max_positions)
        scale = max_positions / original
        expected = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
        given = rope.get("attention_factor")
        if given is not None and not math.isclose(float(given), expected, rel_tol=1e-6):
            refuse(f"longrope attention_factor {given} (llama.cpp uses {expected:.6g})")
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_member)]


def _add_metadata(writer, hf_config: dict, arch: str, dtype: str) -> dict:
    """The hyperparameter keys llama.cpp reads for ``arch``; returns the numbers the tensors need."""
    import gguf

    model_type = hf_config["model_type"]
    hidden = int(hf_config["hidden_size"])
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = int(hf_config.get("head_dim") or hidden // heads)
    rope = _rope(hf_config)
    max_positions = int(hf_config.get("max_position_embeddings", 2048))
    partial = float(rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0)) or 1.0)
    writer.add_context_length(max_positions)
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(hf_config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(hf_config["intermediate_size"]))
    if model_type in _MOE:
        writer.add_expert_count(int(hf_config.get("num_local_experts") or hf_config["num_experts"]))
        writer.add_expert_used_count(int(hf_config["num_experts_per_tok"]))
        if model_type == "qwen3_moe":
            writer.add_expert_feed_forward_length(int(hf_config["moe_intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(int(head_dim * partial))
    if head_dim != hidden // heads or model_type in ("gemma", "gemma2", "qwen3", "qwen3_moe"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hf_config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(hf_config["vocab_size"]))
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(int(file_types[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    window = hf_config.get("sliding_window")
    if model_type == "mistral" and window:
        writer.add_sliding_window(int(window))  # llama.cpp's llama architecture runs full attention
    if model_type == "gemma2":
        full = set(hf_config.get("layer_types") or ["sliding_attention"]) == {"full_attention"}
        writer.add_sliding_window(max_positions if full or not window else int(window))
        writer.add_attn_logit_softcapping(float(hf_config.get("attn_logit_softcapping") or 0.0))
        writer.add_final_logit_softcapping(float(hf_config.get("final_logit_softcapping") or 0.0))
    if model_type == "phi3":
        original = int(rope.get("original_max_position_embeddings")
                       or hf_config.get("original_max_position_embeddings") or max_positions)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(int(window or 0))  # 0: no window (llama.cpp's converter's convention)
        if rope["rope_type"] == "longrope":
            scale = max_positions / original
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "rope": rope, "rotary": int(head_dim * partial)}


def _extra_tensors(hf_config: dict, numbers: dict, out_path) -> list[tuple[str, np.ndarray]]:
    """RoPE frequency tensors: Llama-3's ``rope_freqs`` and Phi-3's ``rope_factors_long/short``."""
    import gguf

    rope, head_dim = numbers["rope"], numbers["head_dim"]
    if rope["rope_type"] == "llama3":
        theta = float(rope["rope_theta"])
        inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelength = 2 * np.pi / inv_freq
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        original = float(rope["original_max_position_embeddings"])
        smooth = (original / wavelength - low) / (high - low)
        factors = np.where(wavelength < original / high, 1.0,
                           np.where(wavelength > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.astype(np.float32))]
    if rope["rope_type"] == "longrope":
        long, short = (np.asarray(rope[key], np.float32) for key in ("long_factor", "short_factor"))
        if long.shape != short.shape or long.shape != (numbers["rotary"] // 2,):
            raise CheckpointError(f"{out_path}: write_gguf: longrope factors must have {numbers['rotary'] // 2} "
                                  f"entries each, not {long.shape[0]} and {short.shape[0]}")
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", long),
                (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", short)]
    return []


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


_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+\.weight)$")


def _stacked_experts(tensors: Iterable[tuple[str, np.ndarray]], hf_config: dict, out_path):
    """The tensors with each projection's per-expert tensors (``...experts.{e}.w1.weight``) stacked into one
    ``[experts, out, in]`` tensor (``...experts.w1.weight``), as llama.cpp's ``ffn_*_exps`` hold them; a
    projection's experts arrive one after another, so one projection is buffered at a time."""
    experts = int(hf_config.get("num_local_experts") or hf_config.get("num_experts") or 0)
    pending: dict[str, dict[int, np.ndarray]] = {}
    for name, array in tensors:
        match = _EXPERT_TENSOR.match(name)
        if match is None:
            yield name, array
            continue
        stacked = f"{match.group(1)}.{match.group(3)}"
        parts = pending.setdefault(stacked, {})
        parts[int(match.group(2))] = np.asarray(array, dtype=np.float32)
        if len(parts) == experts:
            yield stacked, np.stack([parts[e] for e in range(experts)])
            del pending[stacked]
    if pending:
        name, parts = next(iter(pending.items()))
        raise CheckpointError(f"{out_path}: write_gguf: {name} has {len(parts)} of the {experts} experts' tensors")


def write_gguf_from_hf(hf_config: dict, tensors: Iterable[tuple[str, np.ndarray]], tokenizer, out_path, *,
                       dtype: str = "f16", tokenizer_pre: str | None = None, name: str | None = None) -> pathlib.Path:
    """Write a llama.cpp-compatible GGUF from a ``config.json`` dict and HF-named [out, in] tensors.

    Families: Llama, Mistral and Mixtral (llama.cpp's "llama" architecture), Qwen2, Qwen3, Qwen3-MoE, Gemma,
    Gemma 2 and Phi-3, with the architecture, tensor names and metadata keys of llama.cpp's converter (gguf-py's
    tables; each projection of all experts stacked in one ``ffn_*_exps`` tensor).
    """
    import gguf

    out_path = pathlib.Path(out_path)
    if dtype not in _WRITE_DTYPES:
        raise CheckpointError(f"write_gguf: dtype '{dtype}' is not one of {', '.join(_WRITE_DTYPES)}")
    arch = check_exportable(hf_config, where=str(out_path))
    if tokenizer is not None:
        tokenizer_kind(tokenizer, out_path)
    model_type = hf_config["model_type"]
    layers = int(hf_config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, _FAMILIES[model_type][0]), layers)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or out_path.stem)
    numbers = _add_metadata(writer, hf_config, arch, dtype)
    if tokenizer is not None:
        add_tokenizer(writer, tokenizer, int(hf_config["vocab_size"]), out_path, tokenizer_pre)
    else:  # the config's special ids, as llama.cpp's converter reads them from config.json
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("pad_token_id", writer.add_pad_token_id)):
            if isinstance(hf_config.get(key), int):
                add(hf_config[key])
    for tensor_name, data in _extra_tensors(hf_config, numbers, out_path):
        writer.add_tensor(tensor_name, data)
    tied = bool(hf_config.get("tie_word_embeddings")) or model_type in ("gemma", "gemma2")
    seen = set()
    for hf_name, array in _stacked_experts(tensors, hf_config, out_path):
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CheckpointError(f"{out_path}: write_gguf: tensor {hf_name} has no GGUF name for the {arch} "
                                  f"architecture")
        array = np.asarray(array, dtype=np.float32)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _rope_rows_to_ggml(array, numbers["heads"])
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _rope_rows_to_ggml(array, numbers["kv_heads"])
        if model_type in ("gemma", "gemma2") and hf_name.endswith("norm.weight"):
            array = array + 1.0  # GGML multiplies by the weight; Gemma's RMSNorm by 1 + w
        data, raw_type = _encode_tensor(array, dtype)
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
    """Export a Decoder (LoRA merged) with its tokenizer to a GGUF file llama.cpp can run.

    ``dtype``: "f16" (default), "bf16", "q8_0" or "f32"; norms stay float32. ``config`` is the model's
    ModelConfig. The tokenizer is byte-level BPE or SentencePiece (``tokenizer=None`` writes none).
    """
    hf_config = config.to_hf_dict()
    return write_gguf_from_hf(hf_config, iter_hf_tensors(model, config, dtype=np.float32), tokenizer, out_path,
                              dtype=dtype, tokenizer_pre=tokenizer_pre, name=name)
