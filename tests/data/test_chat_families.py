"""chat.py on the Gemma 3, Gemma 4 and Qwen3 chat templates as they ship (assets/chat_templates): token ids are
transformers' rendering of the whole conversation, and what trains is written out per template -- each assistant
message's content and its end-of-turn token, never a system, user or tool message or a role header; reasoning
per ``train_reasoning`` where the template renders it. The tokenizer is the one tests/data/test_chat.py gives
these templates (a real vocabulary with the templates' marker strings as special tokens)."""

from __future__ import annotations

import warnings

import pytest

from sftjax.data.chat import encode_conversation
from tests.data.test_chat import CONVERSATION, _family_tokenizer, _runs

warnings.filterwarnings("ignore")

CONTENTS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
REASONED = [dict(m, reasoning_content=f"plan {k}") if m["role"] == "assistant" else m
            for k, m in enumerate(CONVERSATION)]
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}]
# a reasoning turn that calls a tool, after the last user message (where templates keep the reasoning)
TOOL_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "", "reasoning_content": "use the tool",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "4"},
    {"role": "assistant", "content": "It is 4."},
]
GEMMA3 = "axolotl/gemma3.jinja"
GEMMA4 = ("axolotl/gemma4.jinja", "llama.cpp/google-gemma-4-31B-it-interleaved.jinja")
QWEN3 = ("axolotl/qwen3.jinja", "llama.cpp/Qwen-Qwen3-0.6B.jinja")


def _template(assets_dir, name):
    template = (assets_dir / "chat_templates" / name).read_text()
    return template, _family_tokenizer(assets_dir, name, template)


def _trained(assets_dir, name, messages, *, tools=None, end_of_turn=None, **kwargs):
    """The trained runs of text; the ids are transformers' and every run ends with the end-of-turn token."""
    template, tok = _template(assets_dir, name)
    conversation = {"messages": messages, **({"tools": tools} if tools else {})}
    ids, mask = encode_conversation(conversation, tok, chat_template=template, **kwargs)
    reference = tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=True,
                                        return_dict=True)
    assert ids == list(reference["input_ids"])
    runs = _runs(ids, mask)
    if end_of_turn is not None:
        assert all(run[-1] == tok.convert_tokens_to_ids(end_of_turn) for run in runs), runs
    return [tok.decode(run) for run in runs]


def test_gemma3_trains_model_turns_and_end_of_turn(assets_dir):
    """The system prompt is folded into the first user turn; it and every user turn stay untrained."""
    expected = [c + "<end_of_turn>" for c in CONTENTS]
    assert _trained(assets_dir, GEMMA3, CONVERSATION, end_of_turn="<end_of_turn>") == expected
    assert _trained(assets_dir, GEMMA3, CONVERSATION[1:]) == expected
    assert _trained(assets_dir, GEMMA3, CONVERSATION[:4]) == expected[:1]  # ends with a user message
    assert _trained(assets_dir, GEMMA3, CONVERSATION, masking="last_assistant") == expected[-1:]
    # the template has no place for reasoning: it is not rendered, so nothing of it trains under any policy
    for policy in ("all", "none"):
        assert _trained(assets_dir, GEMMA3, REASONED, train_reasoning=policy) == expected


@pytest.mark.parametrize("name", GEMMA4)
def test_gemma4_trains_model_turns_and_end_of_turn(assets_dir, name):
    expected = [c + "<turn|>" for c in CONTENTS]
    assert _trained(assets_dir, name, CONVERSATION, end_of_turn="<turn|>") == expected
    assert _trained(assets_dir, name, CONVERSATION[:4]) == expected[:1]
    # reasoning of turns without tool calls is not rendered (Gemma 4 keeps it only around tool calls)
    assert _trained(assets_dir, name, REASONED) == expected


@pytest.mark.parametrize("name, call_end", [(GEMMA4[0], "<|tool_response>"), (GEMMA4[1], "<turn|>")])
def test_gemma4_reasoning_around_a_tool_call(assets_dir, name, call_end):
    """The thought channel of a tool-calling turn trains per policy, its opening tag included: the generation
    prompt's empty channel (thinking off) is not the turn's prompt; the tool's answer never trains."""
    thought = "use the tool\n<channel|>" if name == GEMMA4[0] else "use the tool<channel|>"
    call = "<|tool_call>call:add{a:2,b:2}<tool_call|>" + call_end
    assert _trained(assets_dir, name, TOOL_TURN, tools=TOOLS) == [
        "<|channel>thought\n" + thought + call, "It is 4.<turn|>"]
    assert _trained(assets_dir, name, TOOL_TURN, tools=TOOLS, train_reasoning="none") == [call, "It is 4.<turn|>"]


@pytest.mark.parametrize("name, final_prefix", [(QWEN3[0], "</think>\n\n"), (QWEN3[1], "<think>\n\n</think>\n\n")])
def test_qwen3_trains_assistant_turns_and_end_of_turn(assets_dir, name, final_prefix):
    """Both templates write an empty think block into the final turn only. The Hub template's generation prompt
    ends at the role header, so the block is the turn's own text; axolotl's writes ``<think>\\n\\n`` itself, so
    only the rest of the block is the model's."""
    assert _trained(assets_dir, name, CONVERSATION, end_of_turn="<|im_end|>") == [
        CONTENTS[0] + "<|im_end|>", CONTENTS[1] + "<|im_end|>", final_prefix + CONTENTS[2] + "<|im_end|>"]
    assert _trained(assets_dir, name, CONVERSATION[:4]) == [CONTENTS[0] + "<|im_end|>"]


@pytest.mark.parametrize("name, opening", [(QWEN3[0], ""), (QWEN3[1], "<think>\n")])
@pytest.mark.parametrize("policy", ["all", "last", "none"])
def test_qwen3_thinking_blocks(assets_dir, name, opening, policy):
    """Reasoning before the last user message is dropped by the templates (context never shows it, nothing of it
    trains); the final turn's think block trains under all/last, not under none, and its content and
    <|im_end|> train either way. (axolotl's generation prompt supplies ``<think>\\n``.)"""
    final = CONTENTS[2] + "<|im_end|>"
    if policy != "none":
        final = opening + "plan 6\n</think>\n\n" + final
    runs = _trained(assets_dir, name, REASONED, train_reasoning=policy)
    assert runs == [CONTENTS[0] + "<|im_end|>", CONTENTS[1] + "<|im_end|>", final]


@pytest.mark.parametrize("policy", ["all", "none"])
def test_qwen3_reasoning_of_a_tool_calling_turn(assets_dir, policy):
    """A turn with only reasoning and a tool call: under none the whole think block (closing tag included) is
    context; the call and <|im_end|> train; the tool's answer (a user turn in Qwen3) never trains."""
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>'
    first = ("<think>\nuse the tool\n</think>\n\n" + call) if policy == "all" else call
    assert _trained(assets_dir, QWEN3[1], TOOL_TURN, tools=TOOLS, train_reasoning=policy) == [
        first, "<think>\n\n</think>\n\nIt is 4.<|im_end|>"]
