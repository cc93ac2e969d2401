"""Dataset rows -> one canonical conversation.

Canonical form (what ``chat.py`` renders)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                   optional "tool_calls": [{"type": "function", "function": {"name", "arguments"}}],
                   optional "name", "tool_call_id", "reasoning_content": str,
                   optional "train": bool, "loss_weight": float}, ...],
     "tools": optional list of {"type": "function", "function": {...}},
     "completion_start": optional int,     # prompt/completion rows: index of the first completion message
     "plain": optional (prompt, completion)} # string prompt/completion, rendered raw if there is no template

or, for plain ``text`` rows (continued pre-training), ``{"text": str}``.

Formats: OpenAI ``messages`` (content may be a string or a list of parts ``{"type": "text"|"reasoning"|
"tool_call", "text"|"value": ...}``), ShareGPT ``conversations`` with ``from``/``value``, alpaca
(``instruction``/``input``/``output``/``system``/``history``), ``prompt``/``completion`` (strings or message lists)
and ``text``. Column names can be renamed per source. Every problem is a one-line DataError naming the row.
"""

from __future__ import annotations

import json
from typing import Any

from sftjax.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {
    "system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "model": "assistant", "bot": "assistant", "tool": "tool", "observation": "tool", "function": "tool",
    "ipython": "tool", "function_call": "assistant",
}
MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content", "train", "loss_weight")


def detect_format(row: dict, columns: dict | None = None) -> str:
    """Name the format of ``row`` from its columns (after renames); '' when nothing matches."""
    col = _column_getter(columns)
    if col("messages") in row:
        return "messages"
    if col("conversations") in row:
        return "sharegpt"
    if col("instruction") in row and col("output") in row:
        return "alpaca"
    if col("prompt") in row and col("completion") in row:
        return "prompt_completion"
    if col("text") in row:
        return "text"
    return ""


def to_conversation(
    row: dict,
    format: str = "auto",
    columns: dict | None = None,
    location: str | None = None,
    system_prompt: str | None = None,
) -> dict:
    """Map one dataset row to the canonical conversation (see the module docstring)."""
    where = location or "row"
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is a {type(row).__name__}, expected an object with named columns")
    col = _column_getter(columns)
    if format == "auto":
        format = detect_format(row, columns)
        if not format:
            raise DataError(
                f"{where}: cannot detect the format from columns {sorted(map(str, row))}; expected one of "
                "messages, conversations, instruction+output, prompt+completion, text (or rename with columns:)"
            )
    builders = {
        "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
        "prompt_completion": _from_prompt_completion, "text": _from_text,
    }
    if format not in builders:
        raise DataError(f"{where}: unknown format {format!r}; choose one of {', '.join(builders)}")
    conversation = builders[format](row, col, where)
    if "messages" in conversation:
        if not conversation["messages"]:
            raise DataError(f"{where}: conversation is empty")
        system = row.get(col("system")) if format in ("messages", "sharegpt") else None
        system = _string(system, where, col("system"), allow_none=True) or system_prompt
        if system and conversation["messages"][0]["role"] != "system":
            conversation["messages"].insert(0, {"role": "system", "content": system})
            if "completion_start" in conversation:
                conversation["completion_start"] += 1
        tools = row.get(col("tools"))
        if tools is not None and tools != "":
            tools = _parse_tools(tools, where)
            if tools:
                conversation["tools"] = tools
    return conversation


def _column_getter(columns: dict | None):
    columns = columns or {}
    return lambda name: columns.get(name, name)


def _require(row: dict, column: str, where: str) -> Any:
    if column not in row:
        raise DataError(f"{where}: missing column {column!r} (row has {sorted(map(str, row))})")
    return row[column]


def _string(value: Any, where: str, what: str, allow_none: bool = False) -> str:
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _parse_json_maybe(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _tool_call(value: Any, where: str) -> dict:
    """A tool call from a dict or JSON string, in the {'type': 'function', 'function': {...}} form."""
    call = _parse_json_maybe(value)
    if not isinstance(call, dict):
        raise DataError(f"{where}: tool call {str(value)[:60]!r} is not a JSON object with 'name' and 'arguments'")
    call = dict(call)
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(f"{where}: tool call has no string 'name'")
    function = dict(function)
    function["arguments"] = _parse_json_maybe(function.get("arguments", {}))
    out = {"type": "function", "function": {"name": function["name"], "arguments": function["arguments"]}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def _parse_tools(tools: Any, where: str) -> list:
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: 'tools' is not valid JSON ({err.msg})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: 'tools' must be a list of JSON objects")
    return [t if "function" in t and t.get("type", "function") == "function" else {"type": "function", "function": t}
            for t in tools]


def _message(raw: Any, where: str, index: int) -> dict:
    """Validate and normalise one OpenAI-style message."""
    here = f"{where}: message {index}"
    if not isinstance(raw, dict):
        raise DataError(f"{here} is a {type(raw).__name__}, expected an object with 'role' and 'content'")
    role = raw.get("role")
    if role not in ROLE_ALIASES:
        raise DataError(f"{here} has unknown role {role!r}; allowed: {', '.join(ROLES)}")
    message = {"role": ROLE_ALIASES[role]}
    content = raw.get("content")
    reasoning, tool_calls = [], []
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise DataError(f"{here} content part is a {type(part).__name__}, expected a string or object")
            kind = part.get("type", "text")
            value = part.get("text", part.get("value"))
            if kind == "text":
                texts.append(_string(value, here, "text part"))
            elif kind in ("reasoning", "thinking"):
                reasoning.append(_string(value, here, "reasoning part"))
            elif kind in ("tool_call", "function_call"):
                tool_calls.append(_tool_call(value, here))
            else:
                raise DataError(f"{here} has a content part of unsupported type {kind!r} (text, reasoning, tool_call)")
        content = "".join(texts)
    else:
        content = _string(content, here, "content", allow_none=bool(raw.get("tool_calls")) or role != "user")
    message["content"] = content
    if raw.get("tool_calls"):
        calls = raw["tool_calls"]
        calls = _parse_json_maybe(calls)
        if not isinstance(calls, list):
            calls = [calls]
        tool_calls = [_tool_call(c, here) for c in calls] + tool_calls
    if tool_calls:
        message["tool_calls"] = tool_calls
    key = next((k for k in ("reasoning_content", "thinking", "reasoning") if raw.get(k)), None)
    if reasoning or key:  # a message's reasoning under any of its usual keys, or as content parts
        message["reasoning_content"] = "".join(reasoning) or _string(raw[key], here, key)
    for key in ("name", "tool_call_id"):
        if raw.get(key) is not None:
            message[key] = _string(raw[key], here, key)
    if "train" in raw and raw["train"] is not None:
        if not isinstance(raw["train"], bool):
            raise DataError(f"{here} has train={raw['train']!r}; expected true or false")
        message["train"] = raw["train"]
    if "loss_weight" in raw and raw["loss_weight"] is not None:
        weight = raw["loss_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise DataError(f"{here} has loss_weight={weight!r}; expected a number >= 0")
        message["loss_weight"] = float(weight)
    if message["role"] == "assistant" and not message["content"] and "tool_calls" not in message \
            and "reasoning_content" not in message:
        raise DataError(f"{here}: assistant message has empty content")
    return message


def _messages_list(value: Any, where: str, what: str, offset: int = 0) -> list[dict]:
    value = _parse_json_maybe(value) if isinstance(value, str) and value.lstrip().startswith("[") else value
    if not isinstance(value, list):
        raise DataError(f"{where}: {what} must be a list of messages, got {type(value).__name__}")
    return [_message(m, where, i + offset) for i, m in enumerate(value)]


def _from_messages(row: dict, col, where: str) -> dict:
    messages = _require(row, col("messages"), where)
    if isinstance(messages, list) and messages and isinstance(messages[0], dict) and "from" in messages[0]:
        return _from_sharegpt({"conversations": messages}, lambda name: name, where)  # ShareGPT turns
    return {"messages": _messages_list(messages, where, col("messages"))}


def _from_sharegpt(row: dict, col, where: str) -> dict:
    turns = _require(row, col("conversations"), where)
    if not isinstance(turns, list):
        raise DataError(f"{where}: {col('conversations')!r} must be a list of turns, got {type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        if isinstance(turn, dict) and "role" in turn and "from" not in turn:
            messages.append(_message(turn, where, index))  # already OpenAI-style
            continue
        if not isinstance(turn, dict) or "from" not in turn:
            raise DataError(f"{where}: turn {index} must be an object with 'from' and 'value'")
        source_role, value = turn["from"], turn.get("value")
        if source_role not in ROLE_ALIASES:
            raise DataError(f"{where}: turn {index} has unknown role {source_role!r}; allowed: "
                            "system, human, gpt, function_call, observation (or user/assistant/tool)")
        here = f"{where}: turn {index}"
        value = _string(value, here, "value")
        if source_role == "function_call":
            call = _parse_json_maybe(value)
            calls = call if isinstance(call, list) else [call]
            try:
                message = {"role": "assistant", "content": "", "tool_calls": [_tool_call(c, here) for c in calls]}
            except DataError:  # not parseable as a call: keep the text as the assistant's output
                message = {"role": "assistant", "content": value}
        else:
            message = {"role": ROLE_ALIASES[source_role], "content": value}
            if message["role"] == "tool" and messages and messages[-1].get("tool_calls"):
                message["name"] = messages[-1]["tool_calls"][0]["function"]["name"]
        for key in ("train", "loss_weight"):
            if key in turn:
                message[key] = _message({"role": "user", "content": "", key: turn[key]}, where, index)[key]
        messages.append(message)
    return {"messages": messages}


def _from_alpaca(row: dict, col, where: str) -> dict:
    instruction = _string(_require(row, col("instruction"), where), where, col("instruction"))
    extra = _string(row.get(col("input")), where, col("input"), allow_none=True)
    output = _string(_require(row, col("output"), where), where, col("output"))
    messages = []
    system = row.get(col("system"))
    if system:
        messages.append({"role": "system", "content": _string(system, where, col("system"))})
    history = row.get(col("history")) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: {col('history')!r} must be a list of [instruction, response] pairs")
    for index, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"{where}: {col('history')!r} item {index} must be an [instruction, response] pair")
        messages.append({"role": "user", "content": _string(pair[0], where, f"history[{index}][0]")})
        messages.append({"role": "assistant", "content": _string(pair[1], where, f"history[{index}][1]")})
    user = f"{instruction}\n\n{extra}" if extra else instruction
    if not user:
        raise DataError(f"{where}: {col('instruction')!r} is empty")
    if not output:
        raise DataError(f"{where}: {col('output')!r} is empty")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _from_prompt_completion(row: dict, col, where: str) -> dict:
    prompt = _require(row, col("prompt"), where)
    completion = _require(row, col("completion"), where)
    if isinstance(prompt, str) and not prompt.lstrip().startswith("[{"):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _messages_list(prompt, where, col("prompt"))
    if isinstance(completion, str) and not completion.lstrip().startswith("[{"):
        completion_messages = [{"role": "assistant", "content": completion}]
        if not completion:
            raise DataError(f"{where}: {col('completion')!r} is empty")
    else:
        completion_messages = _messages_list(completion, where, col("completion"), offset=len(prompt_messages))
    conversation = {"messages": prompt_messages + completion_messages, "completion_start": len(prompt_messages)}
    if isinstance(prompt, str) and isinstance(completion, str):
        conversation["plain"] = (prompt, completion)  # used as raw text when there is no chat template
    return conversation


def _from_text(row: dict, col, where: str) -> dict:
    text = _string(_require(row, col("text"), where), where, col("text"))
    if not text:
        raise DataError(f"{where}: {col('text')!r} is empty")
    return {"text": text}
