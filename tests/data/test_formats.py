"""formats.to_conversation: every format, from the real dataset files and small hand-written rows."""

from __future__ import annotations

import json
import warnings

import pytest

from sftjax.data.chat import encode_rows
from sftjax.config import SourceConfig
from sftjax.data.formats import detect_format, to_conversation
from sftjax.data.sources import iter_rows
from sftjax.errors import DataError

warnings.filterwarnings("ignore")


def _first(path, **kwargs):
    return next(iter(iter_rows(SourceConfig(path=str(path), **kwargs))))


def test_gsm8k_as_prompt_completion_via_columns(assets_dir):
    location, row = _first(assets_dir / "datasets" / "gsm8k" / "train.jsonl")
    conv = to_conversation(row, format="prompt_completion", columns={"prompt": "question", "completion": "answer"},
                           location=location)
    assert conv["messages"] == [{"role": "user", "content": row["question"]},
                                {"role": "assistant", "content": row["answer"]}]
    assert conv["completion_start"] == 1
    assert detect_format(row, {"prompt": "question", "completion": "answer"}) == "prompt_completion"
    with pytest.raises(DataError, match="train.jsonl:1: cannot detect the format"):
        to_conversation(row, location=location)


def test_alpaca_real_and_history(assets_dir):
    _, row = _first(assets_dir / "datasets" / "instruction" / "alpaca_tiny.json")
    conv = to_conversation(row)
    user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
    assert conv == {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}
    conv = to_conversation({"instruction": "I", "input": "X", "output": "O", "system": "S",
                            "history": [["q1", "a1"]]})
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "I\n\nX"), ("assistant", "O")]


def test_sharegpt_with_system_turn(assets_dir):
    _, row = _first(assets_dir / "datasets" / "chat" / "chat_tiny.json")
    conv = to_conversation(row)
    expected_roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        (expected_roles[t["from"]], t["value"]) for t in row["conversations"]]
    assert conv["messages"][0]["role"] == "system"


def test_glaive_tool_calling(assets_dir):
    _, row = _first(assets_dir / "datasets" / "tool_calling" / "glaive_toolcall_en_demo.json")
    conv = to_conversation(row)
    assert conv["tools"] == [{"type": "function", "function": t} for t in json.loads(row["tools"])]
    calls = [t for t in row["conversations"] if t["from"] == "function_call"]
    messages_with_calls = [m for m in conv["messages"] if m.get("tool_calls")]
    assert len(messages_with_calls) == len(calls)
    for message, turn in zip(messages_with_calls, calls):
        expected = json.loads(turn["value"])
        assert message["role"] == "assistant"
        assert message["tool_calls"][0]["function"] == {"name": expected["name"], "arguments": expected["arguments"]}
    tool_messages = [m for m in conv["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == sum(t["from"] == "observation" for t in row["conversations"])


def test_messages_with_loss_weight_and_parts(assets_dir):
    _, row = _first(assets_dir / "datasets" / "chat" / "v1_sft_demo.jsonl")
    conv = to_conversation(row)
    assert conv["messages"] == [
        {"role": m["role"], "content": "".join(p["value"] for p in m["content"]), "loss_weight": m["loss_weight"]}
        for m in row["messages"]]


def test_reasoning_tool_use(assets_dir):
    path = assets_dir / "datasets" / "tool_calling" / "reason_tool_use_demo_50.jsonl"
    for _, row in iter_rows(SourceConfig(path=str(path))):
        conv = to_conversation(row)
        tools = json.loads(row["tools"])
        assert conv.get("tools", []) == [t if "function" in t else {"type": "function", "function": t} for t in tools]
        for raw, message in zip(row["messages"], conv["messages"]):
            parts = raw["content"]
            assert message["content"] == "".join(p["value"] for p in parts if p["type"] == "text")
            reasoning = "".join(p["value"] for p in parts if p["type"] == "reasoning")
            assert message.get("reasoning_content", "") == reasoning
            calls = [json.loads(p["value"]) for p in parts if p["type"] == "tool_call"]
            assert [c["function"]["name"] for c in message.get("tool_calls", [])] == [c["name"] for c in calls]


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_under_any_usual_key_is_kept(key):
    conv = to_conversation({"messages": [{"role": "user", "content": "2+2?"},
                                         {"role": "assistant", "content": "4", key: "two plus two"}]})
    assert conv["messages"][1] == {"role": "assistant", "content": "4", "reasoning_content": "two plus two"}


def test_text_and_string_tools_and_system_prompt():
    assert to_conversation({"text": "hello"}) == {"text": "hello"}
    conv = to_conversation({"conversation": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                            "tools": '[{"name": "f", "parameters": {}}]'},
                           columns={"messages": "conversation"}, system_prompt="Be brief.")
    assert conv["messages"][0] == {"role": "system", "content": "Be brief."}
    assert conv["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    conv = to_conversation({"prompt": "p", "completion": "c"}, system_prompt="S")
    assert conv["completion_start"] == 2
    # LLaMA-Factory style ShareGPT: a separate system column; turns under "messages" with from/value
    conv = to_conversation({"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                            "system": "Sys"}, system_prompt="ignored")
    assert conv == {"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": 5}]}, "content must be a string, got int"),
    ({"messages": []}, "conversation is empty"),
    ({"messages": "nope"}, "must be a list of messages"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown role 'alien'"),
    ({"conversations": [{"from": "human", "value": ["x"]}]}, "value must be a string"),
    ({"instruction": "i"}, "cannot detect the format"),
    ({"text": 3}, "text must be a string"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": "{bad json"}, "'tools' is not valid JSON"),
])
def test_bad_rows_are_one_line_errors(row, needle):
    with pytest.raises(DataError) as err:
        to_conversation(row, location="data/x.jsonl:7")
    message = str(err.value)
    assert message.startswith("data/x.jsonl:7") and needle in message and "\n" not in message


def test_missing_column_with_explicit_format():
    with pytest.raises(DataError, match="x.jsonl:2: missing column 'output'"):
        to_conversation({"instruction": "i"}, format="alpaca", location="x.jsonl:2")


@pytest.fixture(scope="module")
def qwen2(assets_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "qwen2" / "hf"))


@pytest.mark.parametrize("relative, kwargs", [
    ("gsm8k/test.jsonl", {"format": "prompt_completion", "columns": {"prompt": "question", "completion": "answer"}}),
    ("instruction/alpaca_tiny.json", {}),
    ("chat/chat_tiny.json", {}),
    ("chat/sharegpt_conversation.json", {}),
    ("chat/v1_sft_demo.jsonl", {}),
    ("tool_calling/glaive_toolcall_en_demo.json", {}),
    ("tool_calling/reason_tool_use_demo_50.jsonl", {}),
])
def test_real_files_encode_with_reference_ids(assets_dir, qwen2, relative, kwargs):
    """Every row encodes; ids equal transformers' own apply_chat_template of the canonical conversation."""
    tok = qwen2
    source = SourceConfig(path=str(assets_dir / "datasets" / relative), **kwargs)
    rows = list(iter_rows(source))[:40]
    examples, drops = encode_rows(rows, tok, masking="auto", format=source.format, columns=source.columns)
    examples = list(examples)
    assert len(examples) == len(rows) and not drops
    for (location, row), example in zip(rows[:10], examples):
        conv = to_conversation(row, format=source.format, columns=source.columns)
        reference = tok.apply_chat_template(conv["messages"], tools=conv.get("tools"), tokenize=True)
        assert example["input_ids"] == list(reference["input_ids"] if hasattr(reference, "keys") else reference)
        trained = [t for t, m in zip(example["input_ids"], example["train_mask"]) if m]
        assert trained.count(tok.convert_tokens_to_ids("<|im_end|>")) == sum(
            m["role"] == "assistant" and m.get("loss_weight", 1) != 0 and (
                source.format != "prompt_completion" or i >= conv.get("completion_start", 0))
            for i, m in enumerate(conv["messages"]))
