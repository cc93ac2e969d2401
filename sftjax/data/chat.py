"""Conversation -> token ids + per-token train mask, with any chat template.

How the mask is found
---------------------
The whole conversation is rendered to text once with the chat template (the tokenizer's own, or one the config
names) and that text is tokenized once with ``add_special_tokens=False`` (the template places BOS itself, so there
is never a double BOS): the ids are transformers' ``apply_chat_template`` of the whole conversation. The mask
marks which *tokens* are trained; ``packing.py`` turns it into the loss mask.

* Templates with ``{% generation %}`` markers: the mask is the one transformers computes with
  ``return_assistant_tokens_mask=True``.
* Any other template: each assistant turn's span in that one rendering -- its content plus the end-of-turn text
  the template writes right after it there, never the next message's header -- is found by prefix-diff
  rendering (see ``chat_spans.py``).
* Characters map to tokens through the offsets of the single tokenization: a token is trained iff its characters
  overlap a trained span.

Reasoning (``reasoning_content`` or ``thinking`` on a message) is rendered exactly as the template renders it
(most templates drop it from past turns). Where the rendering holds a turn's reasoning, the reasoning and the think
tags around it are part of that turn's span and trained per ``train_reasoning``: ``all`` (wherever the template
renders it), ``last`` (only in the final assistant message), ``none`` (reasoning is context only; the turn's
content and end-of-turn text still train).

Masking modes: ``assistant`` (every assistant turn), ``completion`` (the completion messages of prompt/completion
rows; the last assistant turn otherwise), ``last_assistant``, ``all`` (every token). A message with
``train: false`` or ``loss_weight: 0`` is never trained (``loss_weight`` is otherwise treated as on/off). Plain
``text`` rows are tokenized with the tokenizer's own special tokens plus EOS and fully trained. An example that ends
up with no trained token raises :class:`DroppedExample` so the caller can drop and count it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator

from sftjax.data.chat_spans import (
    _error,
    _template_messages,
    assistant_spans,
    reasoning_block,
    reasoning_text,
    render,
)
from sftjax.data.formats import to_conversation
from sftjax.errors import DataError

MASKINGS = ("auto", "assistant", "completion", "last_assistant", "all")
REASONING = ("all", "last", "none")
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


class DroppedExample(DataError):
    """A well-formed row that yields nothing to train on; ``reason`` names why (for drop counters)."""

    def __init__(self, message: str, reason: str = "dropped"):
        super().__init__(message)
        self.reason = reason  # kept through pickling (worker processes) via the exception's __dict__


def resolve_chat_template(tokenizer, chat_template: str | None = None) -> str | None:
    """The Jinja source to use: a file path, inline Jinja, or the tokenizer's own template (None if it has none)."""
    if chat_template is None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: use the default one
            template = template.get("default") or next(iter(template.values()), None)
        return template
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    raise DataError(f"chat_template {chat_template!r}: file not found (and it is not inline Jinja)")


def _selected_turns(conversation: dict, masking: str) -> list[int]:
    """Indices of the assistant messages the masking mode trains (before per-message train/loss_weight)."""
    messages = conversation["messages"]
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if masking == "completion":
        start = conversation.get("completion_start")
        chosen = assistants[-1:] if start is None else [i for i in assistants if i >= start]
    elif masking == "last_assistant":
        chosen = assistants[-1:]
    else:
        chosen = assistants
    return [i for i in chosen if messages[i].get("train", True) and messages[i].get("loss_weight", 1.0) != 0]


def _tokenize_with_offsets(tokenizer, text: str, location: str):
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{location}: masks need a fast (Rust) tokenizer with offsets; got {type(tokenizer).__name__}")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), encoding["offset_mapping"]


def _mask_from_spans(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap one of the (sorted, disjoint) spans."""
    mask = [0] * len(offsets)
    spans = sorted(spans)
    k = 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k < len(spans) and a < b and a < spans[k][1] and b > spans[k][0]:
            mask[t] = 1
    return mask


def _eos_id(tokenizer, location: str) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{location}: the tokenizer defines no eos_token, so raw text examples cannot be ended; "
                        "set one (tokenizer.eos_token) or use a chat template")
    return eos


def _encode_text(tokenizer, text: str, location: str) -> tuple[list[int], list[int]]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = _eos_id(tokenizer, location)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids, [1] * len(ids)


def _encode_plain_completion(tokenizer, prompt: str, completion: str, location: str) -> tuple[list[int], list[int]]:
    """No chat template: prompt + completion + EOS as raw text, one tokenization; completion and EOS trained."""
    encoding = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    mask = _mask_from_spans(encoding["offset_mapping"], [(len(prompt), len(prompt) + len(completion))])
    ids.append(_eos_id(tokenizer, location))
    mask.append(1)
    return ids, mask


def encode_conversation(conversation: dict, tokenizer, *, masking: str = "auto", chat_template: str | None = None,
                        location: str | None = None, train_reasoning: str = "all") -> tuple[list[int], list[int]]:
    """Canonical conversation -> (input_ids, train_mask), not truncated."""
    where = location or "row"
    if masking not in MASKINGS:
        raise DataError(f"{where}: masking={masking!r} is not allowed; choose one of {', '.join(MASKINGS)}")
    if train_reasoning not in REASONING:
        raise DataError(f"{where}: train_reasoning={train_reasoning!r} is not allowed; choose one of "
                        f"{', '.join(REASONING)}")
    if "text" in conversation:
        return _encode_text(tokenizer, conversation["text"], where)
    if masking == "auto":
        masking = "completion" if "completion_start" in conversation else "assistant"
    messages, tools = conversation["messages"], conversation.get("tools")
    template = resolve_chat_template(tokenizer, chat_template)
    if template is None and "plain" in conversation:
        return _encode_plain_completion(tokenizer, *conversation["plain"], where)
    if template is None:
        raise DataError(f"{where}: the tokenizer has no chat template; set data.chat_template (a file or Jinja)")
    if masking != "all" and not any(m["role"] == "assistant" for m in messages):
        raise DroppedExample(f"{where}: conversation has no assistant turn to train on", "no_assistant_turn")
    text = render(tokenizer, messages, template, tools=tools, location=where)
    ids, offsets = _tokenize_with_offsets(tokenizer, text, where)
    if masking == "all":
        return ids, [1] * len(ids)
    chosen = _selected_turns(conversation, masking)
    if not chosen:
        raise DroppedExample(f"{where}: no assistant turn is selected for training (masking={masking}, "
                             "train/loss_weight flags)", "no_trained_tokens")
    all_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    untrained = [i for i in all_turns if reasoning_text(messages[i])
                 and (train_reasoning == "none" or (train_reasoning == "last" and i != all_turns[-1]))]
    marked = None
    if GENERATION_TAG.search(template):
        marked = _generation_mask(tokenizer, messages, template, tools, ids, where)
        if chosen == all_turns and not untrained:
            return ids, marked
    spans = assistant_spans(tokenizer, messages, template, text, ids, offsets, tools=tools, location=where)
    _check_tool_calls_rendered(messages, spans, text, where)
    mask = _mask_from_spans(offsets, [spans[i] for i in chosen])
    if marked is not None:
        mask = marked if chosen == all_turns else [a & b for a, b in zip(marked, mask)]
    blocks = {i: block for i in untrained if (block := reasoning_block(text, spans[i], messages[i]))}
    if blocks:  # reasoning the policy leaves untrained is context only (a token shared with the content stays)
        reasoning = _mask_from_spans(offsets, list(blocks.values()))
        rest = _mask_from_spans(offsets, [(block[1], spans[i][1]) for i, block in blocks.items()])
        mask = [m & (not r or k) for m, r, k in zip(mask, reasoning, rest)]
    return ids, mask


def _check_tool_calls_rendered(messages: list[dict], spans: dict, text: str, where: str) -> None:
    """A template that renders a message's first tool call but not the others (gpt-oss's assumes one call per
    message) would train a turn with calls missing: a one-line error instead. (A template that renders no tool
    calls at all is a template without tools; that is the user's choice of template.)"""
    for i, (start, end) in spans.items():
        names = [((call.get("function") or call).get("name") or "") for call in messages[i].get("tool_calls") or []]
        turn = text[start:end]
        if len(names) < 2 or not names[0] or names[0] not in turn:
            continue
        shown = sum(min(turn.count(name), names.count(name)) for name in set(names) if name)
        if shown < len(names):
            raise _error(f"{where}: the chat template renders {shown} of the {len(names)} tool calls of assistant "
                         f"message {i} and drops the rest; give each call its own assistant message (with its "
                         "tool result after it) or use a template that renders them all", "template_error")


def _generation_mask(tokenizer, messages, template, tools, ids, where) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(
            _template_messages(messages), tools=tools, chat_template=template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
    except Exception as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise _error(f"{where}: chat template failed to render: {detail[:200]}", "template_error") from None
    if list(out["input_ids"]) != ids:
        raise _error(f"{where}: generation-marked rendering differs from the plain rendering", "template_error")
    return [int(x) for x in out["assistant_masks"]]


def encode_example(row: dict, tokenizer, *, masking: str = "assistant", chat_template: str | None = None,
                   max_length: int | None = None, format: str = "auto", columns: dict | None = None,
                   location: str | None = None, system_prompt: str | None = None, train_reasoning: str = "all") -> dict:
    """One dataset row -> ``{"input_ids": [...], "train_mask": [...]}`` (truncated to ``max_length`` if given).

    Raises DataError naming ``location`` for a bad row, DroppedExample (with ``reason``) when nothing is trained.
    """
    where = location or "row"
    conversation = to_conversation(row, format=format, columns=columns, location=where, system_prompt=system_prompt)
    ids, mask = encode_conversation(conversation, tokenizer, masking=masking, chat_template=chat_template,
                                    location=where, train_reasoning=train_reasoning)
    if not any(mask):
        raise DroppedExample(f"{where}: example has no trained tokens", "no_trained_tokens")
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            raise DroppedExample(f"{where}: no trained tokens left after truncation to {max_length}",
                                 "no_trained_tokens_after_truncation")
    return {"input_ids": ids, "train_mask": mask}


def encode_rows(rows: Iterable[tuple[str, dict]], tokenizer, *, on_bad_row: str = "error",
                **encode_kwargs) -> tuple[Iterator[dict], Counter]:
    """Encode ``(location, row)`` pairs lazily; returns (iterator of encoded examples, Counter of drop reasons).

    With ``on_bad_row="error"`` a bad row raises (examples emptied only by truncation are still dropped and
    counted); with ``"skip"`` every bad row is skipped and counted under its reason (``bad_row``,
    ``template_error``, ``no_assistant_turn``, ``no_trained_tokens``, ...). The Counter fills as the iterator runs.
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row={on_bad_row!r} is not allowed; choose error or skip")
    drops: Counter = Counter()

    def generate() -> Iterator[dict]:
        for location, row in rows:
            try:
                yield encode_example(row, tokenizer, location=location, **encode_kwargs)
            except DroppedExample as err:
                if on_bad_row == "error" and not err.reason.endswith("after_truncation"):
                    raise
                drops[err.reason] += 1
            except DataError as err:
                if on_bad_row == "error":
                    raise
                drops[getattr(err, "reason", "bad_row")] += 1

    return generate(), drops
