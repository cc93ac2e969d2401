"""chat.py on templates whose final assistant message renders differently from the earlier ones (an EOS only
after the last message, another end marker on the final message, a header for the next reply after it, reasoning
dropped from past turns), and the train_reasoning policy. Expected trained text is written out per template."""

from __future__ import annotations

import warnings

import pytest

from sftjax.data.chat import GENERATION_TAG, encode_conversation
from sftjax.errors import DataError
from tests.data.test_chat import (
    CONVERSATION,
    NO_SYSTEM_ROLE,
    UNSUPPORTED,
    _family_tokenizer,
    _runs,
    _template_names,
)

warnings.filterwarnings("ignore")

REASONED = [dict(m, reasoning_content=f"plan {k}") if m["role"] == "assistant" else m
            for k, m in enumerate(CONVERSATION)]
CONTENTS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def _encode(tok, messages, template, **kwargs):
    ids, mask = encode_conversation({"messages": messages}, tok, chat_template=template, **kwargs)
    reference = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True)
    assert ids == list(reference["input_ids"])  # the ids are transformers' rendering of the whole conversation
    return [tok.decode(r) for r in _runs(ids, mask)]


@pytest.fixture(scope="module")
def tok(assets_dir):
    return _family_tokenizer(assets_dir, "smollm2", "")


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.role == 'assistant' and loop.last %}"
          "{{ END }}{% else %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")


def test_eos_only_after_the_last_message(tok):
    template = CHATML.replace("{{ END }}", "<|im_end|>\n<|endoftext|>")
    assert _encode(tok, CONVERSATION, template) == [
        "Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>", "You are welcome.<|im_end|>\n<|endoftext|>"]


def test_other_end_marker_on_the_final_message(tok):
    template = CHATML.replace("{{ END }}", "<|endoftext|>")
    assert _encode(tok, CONVERSATION, template) == [
        "Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>", "You are welcome.<|endoftext|>"]
    # a conversation that ends with a user message: every assistant message is mid-conversation
    assert _encode(tok, CONVERSATION[:4], template) == ["Hello! How can I help?<|im_end|>"]


# DeepSeek-R1 style: reasoning of past turns dropped, the final turn's reasoning in think tags, EOS after every
# assistant message, the generation prompt opening the think block.
R1_STYLE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<|user|>{{ m.content }}{% elif m.role == "
            "'assistant' %}<|assistant|>{% if loop.last and m.reasoning_content %}<think>\n{{ m.reasoning_content }}"
            "\n</think>\n\n{% endif %}{{ m.content }}<|endoftext|>{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")


@pytest.mark.parametrize("policy, last", [
    ("all", "plan 6\n</think>\n\nYou are welcome.<|endoftext|>"),  # <think>\n is the generation prompt's
    ("last", "plan 6\n</think>\n\nYou are welcome.<|endoftext|>"),
    ("none", "You are welcome.<|endoftext|>"),
])
def test_reasoning_dropped_from_past_turns(tok, policy, last):
    assert _encode(tok, REASONED, R1_STYLE, train_reasoning=policy) == [
        "Hello! How can I help?<|endoftext|>", "It is 4.<|endoftext|>", last]


@pytest.mark.parametrize("policy, expected", [
    ("all", ["<think></think>Hello! How can I help?<|im_end|>", "<think>plan 4</think>It is 4.<|im_end|>",
             "<think>plan 6</think>You are welcome.<|im_end|>"]),
    ("last", ["<think></think>Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>",
              "<think>plan 6</think>You are welcome.<|im_end|>"]),
    ("none", ["<think></think>Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>", "You are welcome.<|im_end|>"]),
])
def test_reasoning_policy_kimi_k2_thinking(assets_dir, policy, expected):
    """Kimi-K2-Thinking renders the reasoning of messages 4 and 6 but only an empty think block on message 2: the
    reasoning trains where it is rendered, per policy; the empty block is the turn's own markup."""
    template = (assets_dir / "chat_templates" / "llama.cpp" / "Kimi-K2-Thinking.jinja").read_text()
    tok = _family_tokenizer(assets_dir, "kimi", template)
    assert _encode(tok, REASONED, template, train_reasoning=policy) == expected


def test_reasoning_policy_qwen3_and_generation_markers(assets_dir):
    qwen3 = (assets_dir / "chat_templates" / "llama.cpp" / "Qwen-Qwen3-0.6B.jinja").read_text()
    tok = _family_tokenizer(assets_dir, "qwen", qwen3)
    thought = "<think>\nplan 6\n</think>\n\nYou are welcome.<|im_end|>"
    assert _encode(tok, REASONED, qwen3)[2] == thought
    assert _encode(tok, REASONED, qwen3, train_reasoning="last")[2] == thought
    assert _encode(tok, REASONED, qwen3, train_reasoning="none")[2] == "You are welcome.<|im_end|>"
    # {% generation %} template: transformers' mask, less exactly the reasoning's tokens
    template = (assets_dir / "chat_templates" / "llama.cpp" / "LFM2.5-8B-A1B.jinja").read_text()
    assert GENERATION_TAG.search(template)
    tok = _family_tokenizer(assets_dir, "lfm", template)
    ids, marked = encode_conversation({"messages": REASONED}, tok, chat_template=template)
    reference = tok.apply_chat_template(REASONED, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert marked == list(reference["assistant_masks"])
    _, mask = encode_conversation({"messages": REASONED}, tok, chat_template=template, train_reasoning="none")
    dropped = [t for t, a, b in zip(ids, marked, mask) if a and not b]
    assert tok.decode(dropped) == "<think>plan 6</think>" and all(b <= a for a, b in zip(marked, mask))


def test_thinking_key_is_rendered_and_trained(assets_dir):
    """A message may carry its reasoning as ``thinking`` (LFM2.5 reads message.thinking)."""
    template = (assets_dir / "chat_templates" / "llama.cpp" / "LFM2.5-8B-A1B.jinja").read_text()
    tok = _family_tokenizer(assets_dir, "lfm", template)
    messages = CONVERSATION[:2] + [{"role": "assistant", "content": "Hello!", "thinking": "greet"}]
    assert _encode(tok, messages, template) == ["<think>greet</think>Hello!<|im_end|>\n"]
    assert _encode(tok, messages, template, train_reasoning="none") == ["Hello!<|im_end|>\n"]


def test_bad_reasoning_policy_is_one_line_error(tok):
    with pytest.raises(DataError, match=r"^f:1: train_reasoning='some' is not allowed; choose one of all, last, none$"):
        encode_conversation({"messages": CONVERSATION}, tok, chat_template=CHATML, train_reasoning="some",
                            location="f:1")


COMMAND_A = ["axolotl/command_a.jinja", "axolotl/command_a_rag.jinja", "axolotl/command_a_tool_use.jinja",
             "llama.cpp/CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja"]


@pytest.mark.parametrize("name", COMMAND_A)
def test_command_a_templates(assets_dir, name):
    """Command-A writes a header for the next reply after the final message even without a generation prompt:
    each turn trains its content and <|END_RESPONSE|><|END_OF_TURN_TOKEN|>, never a header."""
    template = (assets_dir / "chat_templates" / name).read_text()
    tok = _family_tokenizer(assets_dir, name, template)
    ending = "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"
    assert _encode(tok, CONVERSATION, template) == [c + ending for c in CONTENTS]
    assert _encode(tok, CONVERSATION[:3], template) == [CONTENTS[0] + ending]
    assert _encode(tok, CONVERSATION[:4], template) == [CONTENTS[0] + ending]
    assert _encode(tok, REASONED, template, train_reasoning="none") == [c + ending for c in CONTENTS]


@pytest.mark.parametrize("name", [n for n in _template_names() if n not in UNSUPPORTED])
def test_every_real_template_with_reasoning(assets_dir, name):
    """Every assistant message carries reasoning: ids stay transformers'; each turn's reasoning is trained iff the
    template renders it (policy all), never with policy none; the turn's content is trained either way."""
    template = (assets_dir / "chat_templates" / name).read_text()
    tok = _family_tokenizer(assets_dir, name, template)
    messages = REASONED[1:] if name in NO_SYSTEM_ROLE else REASONED
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    for policy in ("all", "none"):
        runs = _encode(tok, messages, template, train_reasoning=policy)
        assert len(runs) == len(CONTENTS), runs
        for k, (run, content) in enumerate(zip(runs, CONTENTS)):
            reasoning = f"plan {2 * k + 2}"
            assert content in run
            rendered = reasoning in text
            assert (reasoning in run) == (rendered and policy == "all"), (policy, run)
