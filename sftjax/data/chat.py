"""Conversation -> token ids + per-token train mask, with any chat template.

How the mask is found
---------------------
The conversation is rendered to text once with the chat template (the tokenizer's own, or one the config names)
and that text is tokenized once with ``add_special_tokens=False`` (the template places BOS itself, so there is
never a double BOS). The mask marks which *tokens* are trained; ``packing.py`` turns it into the loss mask.

* Templates with ``{% generation %}`` markers: the mask is the one transformers computes with
  ``return_assistant_tokens_mask=True``.
* Any other template (prefix-diff): for each assistant turn ``i`` we render ``S = messages[:i]`` with the
  generation prompt and ``E = messages[:i+1]`` without it. The turn's **span** is the text the template writes
  for the turn *after the generation prompt*: ``E`` minus its longest common prefix with ``S``, minus trailing
  whitespace. So the span is the content plus the template's end-of-turn text (``<|im_end|>``, ``<|eot_id|>``,
  ``</s>``, ``<end_of_turn>``, ...) and stops before the newline / next turn's header. Text a generation prompt
  already supplies (e.g. ``<think>\\n`` for DeepSeek-R1) is prompt, not trained. The span is then located in the
  full text, searching forward from the end of the message it answers (so a reply that repeats the question is
  not found inside the question), so templates that render *earlier* turns differently
  once later turns exist (system prompt moved, reasoning stripped from history) still work. If the turn itself
  renders differently when it is not the last one (e.g. Qwen3 writes an empty ``<think></think>`` block only on
  the final turn), the span starts where the turn starts in the full text (after the generation header) and is
  the longest tail of the last-turn rendering found there; failing that it is anchored on the content: content
  + end-of-turn text as found in ``E``.
  A turn that cannot be located raises a DataError rather than training a wrong mask. Some templates write
  the end-of-turn text only when another turn follows (e.g. Apertus omits ``<|assistant_end|>`` after the final
  turn); special tokens between a turn and the next user message's header (learned from the first user turn)
  are end-of-turn text too and are trained.
* Characters map to tokens through the offsets of the single tokenization: a token is trained iff its characters
  overlap a trained span.

Masking modes: ``assistant`` (every assistant turn), ``completion`` (the completion messages of prompt/completion
rows; the last assistant turn otherwise), ``last_assistant``, ``all`` (every token). A message with
``train: false`` or ``loss_weight: 0`` is never trained (``loss_weight`` is otherwise treated as on/off). Plain
``text`` rows are tokenized with the tokenizer's own special tokens plus EOS and fully trained. An example that ends
up with no trained token raises :class:`DroppedExample` so the caller can drop and count it.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator

from sftjax.data.formats import to_conversation
from sftjax.errors import DataError

MASKINGS = ("auto", "assistant", "completion", "last_assistant", "all")
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_TEMPLATE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content")


class DroppedExample(DataError):
    """A well-formed row that yields nothing to train on; ``reason`` names why (for drop counters)."""

    def __init__(self, message: str, reason: str = "dropped"):
        super().__init__(message)
        self.reason = reason  # kept through pickling (worker processes) via the exception's __dict__


def _error(message: str, reason: str) -> DataError:
    err = DataError(message)
    err.reason = reason
    return err


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


def _template_messages(messages: list[dict]) -> list[dict]:
    return [{k: m[k] for k in _TEMPLATE_KEYS if k in m} for m in messages]


def render(tokenizer, messages: list[dict], template: str, *, tools=None, add_generation_prompt=False,
           location: str = "row") -> str:
    """Render ``messages`` to text with ``template``; any template failure becomes a one-line DataError."""
    try:
        text = tokenizer.apply_chat_template(
            _template_messages(messages), tools=tools, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as err:  # jinja raises TemplateError, templates raise_exception(), bad filters -> TypeError
        detail = " ".join(str(err).split()) or type(err).__name__
        raise _error(f"{location}: chat template failed to render: {detail[:200]}", "template_error") from None
    if not isinstance(text, str):
        raise _error(f"{location}: chat template did not render to a string", "template_error")
    return text


def _common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix, in C-speed string comparisons (O(n log n))."""
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def assistant_spans(tokenizer, messages: list[dict], template: str, full_text: str, ids, offsets, *, tools=None,
                    location: str = "row") -> dict[int, tuple[int, int]]:
    """Character span ``[start, end)`` in ``full_text`` of every assistant turn (prefix-diff, see module doc).

    ``ids``/``offsets`` are the one tokenization of ``full_text``; they are used to cut partial matches at token
    boundaries and to accept follow-up end-of-turn text only when it is made of special tokens.
    """
    spans: dict[int, tuple[int, int]] = {}
    search_from = 0
    has_generation_header = None
    edges = _token_edges(offsets)
    first_user = next((j for j, m in enumerate(messages) if m["role"] == "user" and m.get("content", "").strip()),
                      None)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = ""
        if i > 0:
            prompt = render(tokenizer, messages[:i], template, tools=tools, add_generation_prompt=True,
                            location=location)
            if has_generation_header is None:  # checked once: does add_generation_prompt write anything?
                has_generation_header = prompt != render(tokenizer, messages[:i], template, tools=tools,
                                                         location=location)
        ended = render(tokenizer, messages[: i + 1], template, tools=tools, location=location)
        turn_start = _common_prefix_length(prompt, ended)
        content = message.get("content", "").strip()
        if i > 0 and not has_generation_header and content:  # no generation header: the turn starts at its content
            found = ended.find(content, turn_start)
            turn_start = found if found >= 0 else turn_start
        elif content:  # a generation prompt may share its first words with the content ("Here are ...")
            found = ended.rfind(content)
            turn_start = found if 0 <= found < turn_start else turn_start
        turn = ended[turn_start:].rstrip()
        if not turn:
            raise _error(f"{location}: chat template renders assistant message {i} as empty text", "template_error")
        # The turn cannot start before the message it answers: skip past that message's content.
        lower = _after_message(messages, i - 1, full_text, search_from)
        expected = _common_prefix_length(prompt, full_text)
        found = full_text.find(content, lower, expected + len(content)) if content else -1
        expected = found if lower <= found < expected else expected  # prompt shared the content's first words
        anchors = [expected] if expected >= lower else []
        start, end = -1, -1
        if anchors and full_text.startswith(turn, expected):
            start = expected
        else:
            start = full_text.find(turn, lower)
        if start < 0 and i > 0:
            # The turn as the last message carries something it drops mid-conversation (Qwen3's empty think
            # block, a think block kept only after the last query): find where the turn starts in the full text
            # (after the generation prompt's header) and align the longest tail of the turn there.
            no_prompt = render(tokenizer, messages[:i], template, tools=tools, location=location)
            header = prompt[_common_prefix_length(no_prompt, prompt):]
            found = full_text.find(header, lower) if header.strip() else -1
            if found >= 0:
                anchors.append(found + len(header))
            for anchor in anchors:
                dropped = _aligned_tail(turn, full_text, anchor)
                if dropped is not None:
                    start, end = anchor, anchor + len(turn) - dropped
                    break
                matched_end = _match_ignoring_whitespace(turn, full_text, anchor)
                if matched_end is not None:  # e.g. Nemotron-Nano-v2 puts a newline before its end token mid-way
                    start, end = anchor, matched_end
                    break
        if start >= 0:
            end = end if end >= 0 else start + len(turn)
            end += len(_end_of_turn_before_next_user(messages, i, full_text, end, first_user, ids, offsets,
                                                     edges, tokenizer))
            spans[i] = (start, end)
            search_from = end
            continue
        # The turn renders differently when it is not the last one: anchor on its content, then keep the part
        # of its last-turn ending that the full text repeats, cut at a token boundary (all of it, or none of it:
        # e.g. templates that write EOS only after the final turn).
        content_in_ended = ended.rfind(content, turn_start) if content else -1
        start = full_text.find(content, lower) if content_in_ended >= 0 else -1
        if start < 0:
            raise _error(
                f"{location}: cannot locate assistant message {i} in the rendered conversation (the template "
                "renders it differently mid-conversation); use a template with {% generation %} markers",
                "template_error",
            )
        after = start + len(content)
        end_of_turn = ended[content_in_ended + len(content):].rstrip()
        matched = _common_prefix_length(end_of_turn, full_text[after: after + len(end_of_turn)])
        end = _token_boundary_at_or_before(edges, after + matched, after)
        if end not in (after, after + len(end_of_turn)):
            raise _error(
                f"{location}: assistant message {i} ends differently mid-conversation than as the last turn; "
                "cannot tell its end-of-turn text apart (use a template with {% generation %} markers)",
                "template_error",
            )
        spans[i] = (start, end)
        search_from = end
    return spans


def _aligned_tail(turn: str, full_text: str, anchor: int, probe_length: int = 16) -> int | None:
    """Smallest k > 0 with ``full_text[anchor:]`` starting with ``turn[k:]`` (None if there is none)."""
    probe = full_text[anchor: anchor + min(probe_length, len(turn))]
    if not probe.strip():
        return None
    k = turn.find(probe, 1)
    while k >= 0:
        if full_text.startswith(turn[k:], anchor):
            return k
        k = turn.find(probe, k + 1)
    return None


def _match_ignoring_whitespace(turn: str, full_text: str, anchor: int) -> int | None:
    """End position in ``full_text`` of ``turn`` read from ``anchor`` when they differ only in whitespace."""
    i, j = 0, anchor
    while i < len(turn):
        if j < len(full_text) and turn[i] == full_text[j]:
            i, j = i + 1, j + 1
        elif turn[i].isspace():
            i += 1
        elif j < len(full_text) and full_text[j].isspace():
            j += 1
        else:
            return None
    return j


def _after_message(messages, j: int, full_text: str, search_from: int) -> int:
    """Position just after message ``j``'s content in ``full_text`` (searching from ``search_from``)."""
    content = messages[j].get("content", "").strip() if j >= 0 else ""
    found = full_text.find(content, search_from) if content else -1
    return found + len(content) if found >= 0 else search_from


def _common_suffix_length(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def _end_of_turn_before_next_user(messages, i, full_text, end, first_user, ids, offsets, edges, tokenizer) -> str:
    """End-of-turn text a template writes only when another turn follows (e.g. Apertus omits its
    ``<|assistant_end|>`` after the final turn). The gap between this turn and the next user message's content
    is split into [extra][user header], the header being the gap's longest common suffix with the text before
    the first user message's content (cut at a token boundary). The extra is trained only if it consists of
    special tokens, so a numbered header (``[Round 2]``) is never mistaken for an end-of-turn marker."""
    if first_user is None or i + 1 >= len(messages) or messages[i + 1]["role"] != "user":
        return ""
    content = messages[i + 1].get("content", "").strip()
    content_at = full_text.find(content, end) if content else -1
    first_at = full_text.find(messages[first_user]["content"].strip())
    if content_at < 0 or first_at < 0 or content_at == end:
        return ""
    gap = full_text[end:content_at]
    header_start = content_at - _common_suffix_length(gap, full_text[:first_at])
    header_start = _token_boundary_at_or_after(edges, header_start, content_at)
    extra_end = end + len(full_text[end:header_start].rstrip())
    if extra_end <= end:
        return ""
    special = _special_ids(tokenizer)
    inside, k = [], max(bisect.bisect_left(offsets, (end, end)) - 1, 0)
    while k < len(offsets) and offsets[k][0] < extra_end:
        if offsets[k][1] > end:
            inside.append(ids[k])
        k += 1
    if not inside or not all(token in special for token in inside):
        return ""
    return full_text[end:extra_end]


def _special_ids(tokenizer) -> set[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            special.add(int(token_id))
    return special


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


def _token_edges(offsets) -> list[int]:
    """Sorted character positions where a token starts or ends."""
    return sorted({edge for pair in offsets for edge in pair})


def _token_boundary_at_or_before(edges: list[int], position: int, floor: int) -> int:
    """The largest token edge in [floor, position] (``floor`` if none): where a partial match must be cut."""
    k = bisect.bisect_right(edges, position) - 1
    return edges[k] if k >= 0 and edges[k] >= floor else floor


def _token_boundary_at_or_after(edges: list[int], position: int, ceiling: int) -> int:
    """The smallest token edge in [position, ceiling] (``ceiling`` if none)."""
    k = bisect.bisect_left(edges, position)
    return edges[k] if k < len(edges) and edges[k] <= ceiling else ceiling


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
                        location: str | None = None) -> tuple[list[int], list[int]]:
    """Canonical conversation -> (input_ids, train_mask), not truncated."""
    where = location or "row"
    if masking not in MASKINGS:
        raise DataError(f"{where}: masking={masking!r} is not allowed; choose one of {', '.join(MASKINGS)}")
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
    if GENERATION_TAG.search(template):
        marked = _generation_mask(tokenizer, messages, template, tools, ids, where)
        if chosen == all_turns:
            return ids, marked
        spans = assistant_spans(tokenizer, messages, template, text, ids, offsets, tools=tools, location=where)
        keep = _mask_from_spans(offsets, [spans[i] for i in chosen])
        return ids, [a & b for a, b in zip(marked, keep)]
    spans = assistant_spans(tokenizer, messages, template, text, ids, offsets, tools=tools, location=where)
    return ids, _mask_from_spans(offsets, [spans[i] for i in chosen])


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
                   location: str | None = None, system_prompt: str | None = None) -> dict:
    """One dataset row -> ``{"input_ids": [...], "train_mask": [...]}`` (truncated to ``max_length`` if given).

    Raises DataError naming ``location`` for a bad row, DroppedExample (with ``reason``) when nothing is trained.
    """
    where = location or "row"
    conversation = to_conversation(row, format=format, columns=columns, location=where, system_prompt=system_prompt)
    ids, mask = encode_conversation(conversation, tokenizer, masking=masking, chat_template=chat_template,
                                    location=where)
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
