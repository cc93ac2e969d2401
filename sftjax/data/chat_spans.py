"""Where each assistant turn lies in the one rendering of a conversation (templates without generation markers).

The whole conversation is rendered once; that text (tokenized once) is the example. For assistant message ``i``
the conversation is also rendered up to message ``i - 1`` with the generation prompt (``S``) and up to message
``i`` without it (``E``). The turn's **span** is what the template writes for the turn after the generation
prompt: ``E`` minus its longest common prefix with ``S``, minus trailing whitespace -- the content (with any
reasoning and its think tags the template writes there) plus the end-of-turn text (``<|im_end|>``,
``<|eot_id|>``, ``</s>``, ...). Text a generation prompt already supplies (``<think>\\n`` for DeepSeek-R1) is
prompt, not trained; but when the prompt writes an empty reasoning block (Gemma 4's ``<|channel>thought\\n
<channel|>`` with thinking off) and a turn with reasoning diverges inside it, the block's opening tag is the
turn's (it starts where the turn without its reasoning would). The span is located in the full rendering,
searching forward from the end of the message it answers (a reply that repeats the question is not found inside
it), so templates that render earlier turns differently once later turns exist (reasoning dropped from past turns,
a system prompt moved) still work.

When the turn renders differently as the last message than mid-conversation:

* it starts differently (Qwen3 writes an empty think block only on the final turn): the span starts where the
  turn starts in the full text (after the generation header) and is the longest tail of the last-turn rendering
  found there;
* it ends differently -- an EOS written only after the last message, another end marker on the final message, a
  header for the next reply written after the final message (Command-A): the span is the content plus what the
  full rendering writes after it up to the next message's header. That header starts at the template's
  turn-start token (the special token the rendering opens with, after BOS: ``<|im_start|>``,
  ``<|START_OF_TURN_TOKEN|>``, ...), and nothing from that token on is ever trained; failing that, the part of
  the last-turn ending that the full text repeats is kept, cut at a token boundary.

Some templates write the end-of-turn text only when another turn follows (Apertus omits ``<|assistant_end|>``
after the final turn): special tokens (and whitespace between them) after a turn and before the next user
message's header (learned from the first user turn) are end-of-turn text too. A turn that cannot be located
raises a one-line DataError rather than training a wrong mask.
"""

from __future__ import annotations

import bisect
import re

from sftjax.errors import DataError

_TEMPLATE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content", "thinking")


def _error(message: str, reason: str) -> DataError:
    err = DataError(message)
    err.reason = reason
    return err


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
    generation_header = None  # what add_generation_prompt writes (``<|start|>assistant``)
    edges = _token_edges(offsets)
    first_user = next((j for j, m in enumerate(messages) if m["role"] == "user" and m.get("content", "").strip()),
                      None)
    marker = _turn_start_marker(tokenizer, template, ids, offsets, full_text)
    special_texts = _special_texts(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = ""
        if i > 0:
            prompt = render(tokenizer, messages[:i], template, tools=tools, add_generation_prompt=True,
                            location=location)
            if has_generation_header is None:  # checked once: does add_generation_prompt write anything?
                no_prompt = render(tokenizer, messages[:i], template, tools=tools, location=location)
                has_generation_header = prompt != no_prompt
                generation_header = prompt[_common_prefix_length(no_prompt, prompt):].strip() or None
        ended = render(tokenizer, messages[: i + 1], template, tools=tools, location=location)
        turn_start = _common_prefix_length(prompt, ended)
        header_end = _header_end_inside_generation_prompt(tokenizer, messages, i, template, tools, prompt, ended,
                                                          turn_start, location)
        turn_start = turn_start if header_end is None else header_end
        content = message.get("content", "").strip()
        if i > 0 and not has_generation_header and content:  # no generation header: the turn starts at its content
            found = ended.find(content, turn_start)
            turn_start = found if found >= 0 else turn_start
        elif content:  # a generation prompt may share its first words with the content ("Here are ...")
            found = ended.rfind(content)
            turn_start = found if 0 <= found < turn_start else turn_start
        turn = ended[turn_start:].rstrip()
        if marker:  # a header for the next reply written after the final message (Command-A) is not the turn's
            at = turn.find(content) if content else -1
            turn = turn[:_cut_before_marker(turn, at + len(content) if at >= 0 else 0, len(turn), marker,
                                            generation_header)]
        if not turn:
            raise _error(f"{location}: chat template renders assistant message {i} as empty text", "template_error")
        # The turn cannot start before the message it answers: skip past that message's content.
        lower = _after_message(messages, i - 1, full_text, search_from)
        expected = _common_prefix_length(prompt, full_text)
        if header_end is not None and full_text[:header_end] == ended[:header_end]:
            expected = min(expected, header_end)
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
            found = full_text.find(content, start, end) if content else -1
            end = _cut_before_marker(full_text, found + len(content) if found >= 0 else start, end, marker,
                                     generation_header)
            spans[i] = (start, end)
            search_from = end
            continue
        # The turn renders differently when it is not the last one: anchor on its content, then keep the part
        # of its last-turn ending that the full text repeats, cut at a token boundary (all of it, or none of it:
        # e.g. templates that write EOS only after the final turn).
        content_in_ended = ended.rfind(content, turn_start) if content else -1
        start = full_text.find(content, lower) if content_in_ended >= 0 else -1
        content_start = start
        head = ended[turn_start:content_in_ended] if content_in_ended >= 0 else ""
        if start >= 0 and head.strip() and start - len(head) >= lower and full_text.startswith(head, start - len(head)):
            start -= len(head)  # the turn's own markup before its content (Harmony's <|channel|>final<|message|>)
        if start < 0:
            raise _error(
                f"{location}: cannot locate assistant message {i} in the rendered conversation (the template "
                "renders it differently mid-conversation); use a template with {% generation %} markers",
                "template_error",
            )
        after = content_start + len(content)
        end_of_turn = ended[content_in_ended + len(content):].rstrip()
        matched = _common_prefix_length(end_of_turn, full_text[after: after + len(end_of_turn)])
        end = _token_boundary_at_or_before(edges, after + matched, after)
        if end not in (after, after + len(end_of_turn)) or marker:
            end = _end_before_next_header(messages, i, full_text, after, end, end_of_turn, marker, special_texts)
        if end is None:
            raise _error(
                f"{location}: assistant message {i} ends differently mid-conversation than as the last turn; "
                "cannot tell its end-of-turn text apart (use a template with {% generation %} markers)",
                "template_error",
            )
        end += len(_end_of_turn_before_next_user(messages, i, full_text, end, first_user, ids, offsets, edges,
                                                 tokenizer))
        spans[i] = (start, _cut_before_marker(full_text, after, end, marker, generation_header))
        search_from = end
    return spans


def _header_end_inside_generation_prompt(tokenizer, messages, i, template, tools, prompt, ended, turn_start,
                                         location) -> int | None:
    """Where reasoning turn ``i`` starts when it diverges inside the generation prompt (None otherwise).

    A generation prompt may open and close an empty reasoning block (Gemma 4 writes ``<|channel>thought\n
    <channel|>`` when thinking is off). A turn that carries reasoning rewrites that block, so the prompt and the
    turn share its opening tag: the opening tag is the turn's own markup, not prompt. The turn then starts where
    the same turn without its reasoning starts (after the role header). A prompt the turn continues in full
    (``<think>\n`` of DeepSeek-R1) stays prompt."""
    if turn_start >= len(prompt) or not reasoning_text(messages[i]):
        return None
    plain = {k: v for k, v in messages[i].items() if k not in ("reasoning_content", "thinking")}
    without = render(tokenizer, messages[:i] + [plain], template, tools=tools, location=location)
    header_end = _common_prefix_length(prompt, without)
    if header_end >= turn_start or ended[:header_end] != without[:header_end]:
        return None
    return header_end


def _end_before_next_header(messages, i, full_text, after, end, end_of_turn, marker, special_texts) -> int | None:
    """End of assistant turn ``i`` (content ending at ``after``) when its last-turn ending differs from the text
    that follows it in the full rendering; ``end`` is where the shared part of the two endings stops (at a token
    boundary). None when the end-of-turn text cannot be told apart."""
    following = messages[i + 1].get("content", "").strip() if i + 1 < len(messages) else ""
    limit = full_text.find(following, after) if following else -1
    limit = limit if limit >= 0 else len(full_text)
    header = full_text.find(marker, after, limit) if marker else -1
    if header >= 0:  # the next message's header (or the one for the next reply) opens with the turn-start token
        cut = after + len(full_text[after:header].rstrip())
        if end > cut or _is_special_text(full_text[after:cut], special_texts):
            return cut
    shared = after + len(full_text[after:end].rstrip())
    if end == after + len(end_of_turn) or end == after:
        return shared
    # the last-turn ending carries more than the shared part: fine when the rest is special tokens (an EOS
    # written only after the final message), not when it is text
    rest = end_of_turn[end - after:]
    return shared if _is_special_text(rest, special_texts) else None


def _turn_start_marker(tokenizer, template: str, ids, offsets, full_text: str) -> str | None:
    """The special token the rendering opens with (after BOS): the template's turn-start token, if it has one."""
    special = _special_ids(tokenizer)
    k = 0
    if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) and "bos_token" in template:
        k = 1
    while k < len(ids) and not full_text[offsets[k][0]:offsets[k][1]].strip():
        k += 1
    if k >= len(ids) or ids[k] not in special:
        return None
    return full_text[offsets[k][0]:offsets[k][1]]


def _cut_before_marker(full_text: str, content_end: int, end: int, marker: str | None,
                       generation_header: str | None = None) -> int:
    """``end`` moved back to before the first turn-start token after the content (and the whitespace before it).

    A turn-start token that opens the assistant's own header (``generation_header``) with more of the turn after
    it is the reply going on in another message of the same turn (Harmony writes the analysis, the tool call and
    the final answer each as its own ``<|start|>assistant...`` message), not the header of the next reply."""
    at = full_text.find(marker, content_end, end) if marker else -1
    while (at >= 0 and generation_header and full_text.startswith(generation_header, at)
           and full_text[at + len(generation_header):end].strip()):
        at = full_text.find(marker, at + len(generation_header), end)
    return end if at < 0 else content_end + len(full_text[content_end:at].rstrip())


def _special_texts(tokenizer) -> list[str]:
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            texts.add(token.content)
    return sorted((t for t in texts if t.strip()), key=len, reverse=True)


def _is_special_text(text: str, special_texts: list[str]) -> bool:
    """Whether ``text`` is special tokens and whitespace only (at least one special token)."""
    rest = text
    for token in special_texts:
        rest = rest.replace(token, " ")
    return bool(text.strip()) and not rest.strip()


# a closing tag right after the reasoning (``</think>``, Gemma 4's ``<channel|>``, Harmony's ``<|end|>``) and the
# whitespace around it
_CLOSING_TAG = re.compile(r"\s*(?:</[A-Za-z][\w:-]{0,30}>|<\|?[A-Za-z][\w:-]{0,30}\|>)[ \t]*\n*")


def reasoning_text(message: dict) -> str:
    """The message's reasoning (``reasoning_content`` or ``thinking``), stripped; "" if none."""
    value = message.get("reasoning_content") or message.get("thinking") or ""
    return value.strip() if isinstance(value, str) else ""


def reasoning_block(full_text: str, span: tuple[int, int], message: dict) -> tuple[int, int] | None:
    """``[start, content start)`` of a turn's span when the template renders the message's reasoning there (the
    reasoning and the think tags around it); None when the reasoning is not in the rendering."""
    reasoning = reasoning_text(message)
    start, end = span
    at = full_text.find(reasoning, start, end) if reasoning else -1
    if at < 0:
        return None
    content = message.get("content", "").strip()
    content_at = full_text.find(content, at + len(reasoning), end) if content else -1
    closing = _CLOSING_TAG.match(full_text, at + len(reasoning), end)
    if content_at >= 0:
        # the block ends with the tag that closes the reasoning; markup between it and the content opens the
        # content's own message (Harmony: <|end|> closes the analysis message, <|start|>assistant<|channel|>final
        # <|message|> opens the final one) and is the model's output
        return (start, closing.end() if closing and closing.end() <= content_at else content_at)
    # no content after it (a turn of tool calls only): the block ends with the tag that closes the reasoning
    return (start, closing.end() if closing else at + len(reasoning))


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
    special tokens (and whitespace between them), so a numbered header (``[Round 2]``) is never mistaken for an end-of-turn marker."""
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
    if not any(token in special for token in inside) or not all(
            token in special or not tokenizer.decode([token]).strip() for token in inside):
        return ""
    return full_text[end:extra_end]


def _special_ids(tokenizer) -> set[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            special.add(int(token_id))
    return special


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


