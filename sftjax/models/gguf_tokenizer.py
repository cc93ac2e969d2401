"""The tokenizer part of a GGUF file, written the way llama.cpp's converter writes it.

Two kinds of vocabulary, told apart by the tokenizer's ``tokenizer.json`` model:

* byte-level BPE (GPT-2 / Llama 3 / Qwen2 / SmolLM2): ``tokenizer.ggml.model = "gpt2"`` with the tokens, token
  types and merges, and llama.cpp's name of the pre-tokenizer (``tokenizer.ggml.pre``: ``llama-bpe``, ``qwen2``,
  ``gpt-2``);
* SentencePiece (Llama 2 / TinyLlama / Mistral / Gemma / Phi-3, stored by transformers as BPE with byte fallback):
  ``tokenizer.ggml.model = "llama"`` with tokens, scores and token types. The scores are the SentencePiece model's
  own when its ``tokenizer.model`` is at hand (``vocab_file``), else recovered from the merge order (the first merge
  that builds a piece ranks it), which is what llama.cpp's SentencePiece tokenizer merges by.

Both add the special token ids, the add-BOS/EOS flags and the chat template. Problems are one-line
:class:`~sftjax.errors.CheckpointError`\\ s raised before anything is written.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from sftjax.errors import CheckpointError
from sftjax.models.gguf_read import _LLAMA3_SPLIT, _QWEN2_SPLIT

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def tokenizer_pre(backend: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer ("default" when not recognised)."""
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


def _backend(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}


def tokenizer_kind(tokenizer, out_path) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece); any other tokenizer is a one-line error."""
    backend = _backend(tokenizer)
    model = backend.get("model") or {}
    pre = backend.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" or any(
        step.get("type") == "ByteLevel" for step in pre.get("pretokenizers", []))
    if model.get("type") == "BPE" and byte_level:
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise CheckpointError(f"{out_path}: write_gguf supports byte-level BPE (GPT-2/Llama-3/Qwen style) and "
                          f"SentencePiece BPE (Llama-2/Mistral/Gemma style) tokenizers; this one is "
                          f"{model.get('type', type(tokenizer).__name__)} with pre-tokenizer {pre.get('type')}")


def _vocabulary(tokenizer, vocab_size: int, out_path) -> dict[int, str]:
    id_to_token = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(id_to_token) >= vocab_size:
        raise CheckpointError(f"{out_path}: tokenizer has token id {max(id_to_token)} but the model's vocabulary "
                              f"has {vocab_size} rows")
    return id_to_token


def _byte_level_vocab(writer, tokenizer, vocab_size: int, out_path, pre: str | None) -> None:
    import gguf

    backend = _backend(tokenizer)
    id_to_token = _vocabulary(tokenizer, vocab_size, out_path)
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
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or tokenizer_pre(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _sentencepiece_model(tokenizer, id_to_token: dict[int, str]):
    """The tokenizer's own SentencePiece model when it is at hand and spells the same pieces, else None."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if not vocab_file or not os.path.isfile(vocab_file):
        return None
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(vocab_file))
    except (OSError, RuntimeError):
        return None
    same = all(id_to_token.get(i) == processor.IdToPiece(i) for i in range(processor.vocab_size()))
    return processor if same else None


def _merge_scores(backend: dict) -> dict[str, float]:
    """Scores that make llama.cpp's highest-score-first merging follow the BPE merge order."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(backend["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank + 1))
    return scores


def _add_space_prefix(backend: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text (Metaspace prepend, or a Prepend normalizer)."""
    def steps(node, key):
        node = node or {}
        return node.get(key, []) if node.get("type") == "Sequence" else [node]

    for step in steps(backend.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return any(step.get("type") == "Prepend" for step in steps(backend.get("normalizer"), "normalizers"))


def _sentencepiece_vocab(writer, tokenizer, vocab_size: int, out_path) -> None:
    import gguf

    backend = _backend(tokenizer)
    id_to_token = _vocabulary(tokenizer, vocab_size, out_path)
    processor = _sentencepiece_model(tokenizer, id_to_token)
    merge_scores = _merge_scores(backend) if processor is None else {}
    added = tokenizer.added_tokens_decoder
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for index, token in id_to_token.items():
        tokens[index] = token
        if index in added:  # as llama.cpp's converter treats tokenizer_config's added_tokens_decoder
            scores[index] = -1000.0
            types[index] = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
            continue
        if processor is not None and index < processor.vocab_size():
            scores[index] = processor.GetScore(index)
            types[index] = (gguf.TokenType.UNKNOWN if processor.IsUnknown(index) else
                            gguf.TokenType.CONTROL if processor.IsControl(index) else
                            gguf.TokenType.UNUSED if processor.IsUnused(index) else
                            gguf.TokenType.BYTE if processor.IsByte(index) else gguf.TokenType.NORMAL)
            continue
        scores[index] = merge_scores.get(token, 0.0)
        types[index] = (gguf.TokenType.BYTE if _BYTE_TOKEN.match(token) else
                        gguf.TokenType.UNKNOWN if index == tokenizer.unk_token_id else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_add_space_prefix(backend))


def add_tokenizer(writer, tokenizer, vocab_size: int, out_path: pathlib.Path, pre: str | None = None) -> None:
    """Vocabulary, scores or merges, token types, special ids and chat template of ``tokenizer``."""
    if tokenizer_kind(tokenizer, out_path) == "gpt2":
        _byte_level_vocab(writer, tokenizer, vocab_size, out_path, pre)
    else:
        _sentencepiece_vocab(writer, tokenizer, vocab_size, out_path)
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
