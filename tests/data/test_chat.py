"""chat.py: token ids equal transformers' apply_chat_template, masks equal its generation-marker masks or cover
exactly each assistant turn's content + end-of-turn text, on every real template under assets/chat_templates."""

from __future__ import annotations

import functools
import re
import warnings

import jinja2
import pytest

from sftjax.data.chat import DroppedExample, GENERATION_TAG, encode_conversation, encode_example, encode_rows
from sftjax.errors import DataError

warnings.filterwarnings("ignore")

# Templates that transformers itself cannot render a plain system/user/assistant conversation with: each must
# raise a one-line DataError (checked below, with transformers failing too), never silently mis-train.
UNSUPPORTED = {
    "llama.cpp/CohereForAI-c4ai-command-r-plus-tool_use.jinja": "requires tools (iterates over None)",
    "llama.cpp/NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": "requires tools (iterates over None)",
    "llama.cpp/fireworks-ai-llama-3-firefunction-v2.jinja": "requires a 'functions' variable",
}
# Templates that reject a system message (they raise); they are tested on the same dialogue without it.
NO_SYSTEM_ROLE = {"axolotl/gemma.jinja", "extracted/google-gemma-it.from-torchtune-tokenizer_config_gemma.jinja",
                  "llama.cpp/google-gemma-2-2b-it.jinja"}
# Templates that write no end-of-turn text after mid-conversation assistant turns (only content is trained).
# (GLM ends a turn with the next role tag, which belongs to the next turn's header.)
NO_END_OF_TURN = {"llama.cpp/llama-cpp-rwkv-world.jinja", "axolotl/metharme.jinja", "llama.cpp/GLM-4.7-Flash.jinja"}
# Assistant output that templates put before the content and that the model itself must generate.
OUTPUT_PREFIX = {"llama.cpp/meetkai-functionary-medium-v3.2.jinja": "all\n"}  # after the ">>>" prompt

MARKER = re.compile(r"<\|[^\s|<>]{1,40}\|>|<｜[^｜\s]{1,40}｜>|\[\|[A-Za-z_]{1,20}\|\]|</?[A-Za-z][A-Za-z0-9_:]{0,30}\|?>|<\|[a-z_]{1,20}>")
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


def _all_templates(assets_dir):
    return sorted(p for p in (assets_dir / "chat_templates").glob("*/*.jinja"))


def _template_names():
    import os
    import pathlib
    root = pathlib.Path(os.environ.get("SFTJAX_ASSETS", pathlib.Path(__file__).resolve().parents[3]
                                       / "shared" / "assets")) / "chat_templates"
    return sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*.jinja")) or ["<no assets>"]


@functools.lru_cache(maxsize=None)
def _tokenizer(path: str, markers: tuple[str, ...]):
    """A real tokenizer with the templates' marker strings added as special tokens (as the real vocab has them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    vocab = tok.get_vocab()
    tok.add_tokens([m for m in markers if m not in vocab], special_tokens=True)
    return tok


@functools.lru_cache(maxsize=None)
def _markers(assets_dir) -> tuple[str, ...]:
    return tuple(sorted(set(MARKER.findall("\n".join(p.read_text() for p in _all_templates(assets_dir))))))


def _family_tokenizer(assets_dir, name: str, text: str):
    markers = _markers(assets_dir)
    low = name.lower()
    if "llama-3" in low or "llama3" in low or "functionary" in low or "firefunction" in low or "hermes" in low:
        sub = "llama3/hf"
    elif "qwen" in low or "qwq" in low:
        sub = "qwen2/hf"
    else:
        sub = "smollm2"
    return _tokenizer(str(assets_dir / "tokenizers" / sub), markers)


def _runs(ids, mask):
    runs, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _reference_ids(tok, messages, template):
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", _template_names())
def test_every_real_template(assets_dir, name):
    path = assets_dir / "chat_templates" / name
    template = path.read_text()
    tok = _family_tokenizer(assets_dir, name, template)
    messages = CONVERSATION
    if name in NO_SYSTEM_ROLE:
        with pytest.raises(DataError, match="System role not supported"):
            encode_conversation({"messages": messages}, tok, chat_template=template)
        messages = CONVERSATION[1:]
    if name in UNSUPPORTED:
        with pytest.raises(DataError) as err:
            encode_conversation({"messages": messages}, tok, masking="assistant", chat_template=template)
        assert "\n" not in str(err.value) and "failed to render" in str(err.value)
        with pytest.raises((TypeError, jinja2.exceptions.UndefinedError)):  # the reason holds: transformers
            _reference_ids(tok, messages, template)  # cannot render it either
        return
    ids, mask = encode_conversation({"messages": messages}, tok, masking="assistant", chat_template=template)
    assert ids == _reference_ids(tok, messages, template)
    if GENERATION_TAG.search(template):
        reference = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert mask == list(reference["assistant_masks"])
        return
    runs = [tok.decode(r) for r in _runs(ids, mask)]
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(contents), runs
    endings = []
    for run, content in zip(runs, contents):
        at = run.find(content)
        assert at >= 0, (run, content)
        prefix, ending = run[:at], run[at + len(content):]
        # anything before the content is template markup the generation prompt does not supply (e.g. Qwen3's
        # empty think block on the final turn), never a role header; the ending is end-of-turn markup only
        assert MARKER.sub("", prefix.replace(OUTPUT_PREFIX.get(name, "\0"), "")).strip() == "", run
        assert MARKER.sub("", ending).strip() == "", run
        assert ending == ending.rstrip() or not MARKER.search(ending), run
        # never the next turn's header
        assert not [m for m in MARKER.findall(ending) if re.search("user|start|header|begin", m, re.I)
                    or m in ("<|turn>", "<|im_sep|>")], run
        endings.append(ending)
    if name not in NO_END_OF_TURN:
        assert endings[0] and endings[0] == endings[1], endings  # every turn trains the same end-of-turn text
        eot_token = tok.convert_tokens_to_ids(MARKER.findall(endings[0])[-1])
        assert eot_token in [t for t, f in zip(ids, mask) if f]


def test_train_flags_with_generation_markers(assets_dir):
    """{% generation %} template + a turn excluded: the marker mask minus exactly that turn."""
    template = (assets_dir / "chat_templates" / "axolotl" / "phi_4.jinja").read_text()
    tok = _family_tokenizer(assets_dir, "phi_4", template)
    messages = [dict(m) for m in CONVERSATION]
    ids, full_mask = encode_conversation({"messages": messages}, tok, chat_template=template)
    messages[4]["train"] = False
    _, mask = encode_conversation({"messages": messages}, tok, chat_template=template)
    runs = _runs(ids, full_mask)
    assert len(runs) == 3 and [tok.decode(r) for r in _runs(ids, mask)] == [tok.decode(runs[0]), tok.decode(runs[2])]
    assert sum(mask) == sum(full_mask) - len(runs[1])
    _, last = encode_conversation({"messages": messages}, tok, masking="last_assistant", chat_template=template)
    assert [tok.decode(r) for r in _runs(ids, last)] == [tok.decode(runs[2])]


def test_dropped_example_survives_pickling():
    import pickle
    err = pickle.loads(pickle.dumps(DroppedExample("f:1: nothing to train", "no_trained_tokens")))
    assert err.reason == "no_trained_tokens" and str(err) == "f:1: nothing to train"


def test_reasoning_stripped_from_history_qwen3(assets_dir):
    """Qwen3 drops earlier turns' reasoning once a later user turn exists and adds an empty think block to the
    final turn only: each turn's trained text must be what that turn looks like in the full conversation."""
    template = (assets_dir / "chat_templates" / "llama.cpp" / "Qwen-Qwen3-0.6B.jinja").read_text()
    tok = _family_tokenizer(assets_dir, "qwen", template)
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "add them"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6.", "reasoning_content": "add again"},
    ]
    ids, mask = encode_conversation({"messages": messages}, tok, chat_template=template)
    assert ids == _reference_ids(tok, messages, template)
    assert [tok.decode(r) for r in _runs(ids, mask)] == [
        "4.<|im_end|>", "<think>\nadd again\n</think>\n\n6.<|im_end|>"]


@pytest.fixture(scope="module")
def smollm2(assets_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))


def _trained_text(tok, ids, mask):
    return [tok.decode(r) for r in _runs(ids, mask)]


def test_masking_modes_and_flags(smollm2):
    row = {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "two", "train": False},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "three"}]}
    out = encode_example(row, smollm2)
    assert _trained_text(smollm2, out["input_ids"], out["train_mask"]) == ["one<|im_end|>", "three<|im_end|>"]
    out = encode_example(row, smollm2, masking="last_assistant")
    assert _trained_text(smollm2, out["input_ids"], out["train_mask"]) == ["three<|im_end|>"]
    out = encode_example(row, smollm2, masking="all")
    assert all(out["train_mask"])
    # prompt/completion: auto = completion only; the few-shot assistant in the prompt is not trained
    row = {"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "shot"},
                      {"role": "user", "content": "y"}], "completion": "done"}
    out = encode_example(row, smollm2, masking="auto")
    assert _trained_text(smollm2, out["input_ids"], out["train_mask"]) == ["done<|im_end|>"]
    ids = out["input_ids"]
    assert ids == list(smollm2.apply_chat_template(
        row["prompt"] + [{"role": "assistant", "content": "done"}], tokenize=True)["input_ids"])
    assert ids.count(smollm2.bos_token_id) == ids.count(smollm2.convert_tokens_to_ids("<|im_start|>"))


def test_text_rows_train_everything_with_eos(smollm2):
    out = encode_example({"text": "Plain pre-training text."}, smollm2)
    assert out["input_ids"] == smollm2("Plain pre-training text.")["input_ids"] + [smollm2.eos_token_id]
    assert all(out["train_mask"])


def test_truncation_and_drops(smollm2):
    row = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DroppedExample) as err:
        encode_example(row, smollm2, max_length=10, location="f.jsonl:3")
    assert err.value.reason == "no_trained_tokens_after_truncation" and "f.jsonl:3" in str(err.value)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 40}]}
    full = encode_example(row, smollm2)
    cut = encode_example(row, smollm2, max_length=45)
    assert len(full["input_ids"]) > 45 and cut == {k: v[:45] for k, v in full.items()}
    with pytest.raises(DroppedExample) as err:
        encode_example({"messages": [{"role": "user", "content": "hi"}]}, smollm2, location="f.jsonl:4")
    assert err.value.reason == "no_assistant_turn"
    with pytest.raises(DroppedExample):
        encode_example({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "x", "loss_weight": 0}]}, smollm2)


def test_bad_template_is_one_line_error(smollm2, tmp_path):
    with pytest.raises(DataError) as err:
        encode_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                       smollm2, chat_template="{{ raise_exception('nope') }}", location="d.jsonl:2")
    assert "d.jsonl:2" in str(err.value) and "nope" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="file not found"):
        encode_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                       smollm2, chat_template=str(tmp_path / "missing.jinja"))
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% if m.role == 'assistant' %}</s>"
                    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    out = encode_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bee"}]},
                         smollm2, chat_template=str(path))
    assert _trained_text(smollm2, out["input_ids"], out["train_mask"]) == ["bee</s>"]


def test_encode_rows_counts_drops(smollm2):
    rows = [("f:1", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            ("f:2", {"messages": [{"role": "user", "content": "only"}]}),
            ("f:3", {"messages": [{"role": "wizard", "content": "x"}]}),
            ("f:4", {"text": "t"})]
    examples, drops = encode_rows(rows, smollm2, on_bad_row="skip")
    assert len(list(examples)) == 2 and drops == {"no_assistant_turn": 1, "bad_row": 1}
    examples, drops = encode_rows(rows, smollm2, on_bad_row="error")
    with pytest.raises(DataError, match="f:2"):
        list(examples)


def test_encoding_is_not_quadratic(smollm2, monkeypatch):
    """Prefix-diff renders O(turns) prefixes but tokenizes exactly once."""
    calls = []
    original = type(smollm2).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(smollm2), "__call__", counting)
    messages = []
    for k in range(20):
        messages += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"a{k}"}]
    ids, mask = encode_conversation({"messages": messages}, smollm2)
    assert len(calls) == 1 and len(_runs(ids, mask)) == 20


def test_no_chat_template_plain_prompt_completion(assets_dir):
    """A tokenizer without a chat template: string prompt/completion become raw text + EOS (completion trained);
    conversations need a template and say so."""
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "gpt2"))
    assert not gpt2.chat_template
    with pytest.raises(DataError, match="x.jsonl:8: the tokenizer defines no eos_token"):
        encode_example({"text": "hi"}, gpt2, location="x.jsonl:8")
    gpt2.eos_token = "<|endoftext|>"
    out = encode_example({"prompt": "Q: 2+2?\nA:", "completion": " 4, because 2 and 2 make 4."}, gpt2, masking="auto")
    assert out["input_ids"] == gpt2("Q: 2+2?\nA: 4, because 2 and 2 make 4.")["input_ids"] + [gpt2.eos_token_id]
    trained = [t for t, m in zip(out["input_ids"], out["train_mask"]) if m]
    assert gpt2.decode(trained) == " 4, because 2 and 2 make 4." + gpt2.eos_token
    with pytest.raises(DataError, match="x.jsonl:9: the tokenizer has no chat template"):
        encode_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                       gpt2, location="x.jsonl:9")


def test_reply_repeating_the_question_is_located_after_it(assets_dir):
    """Content anchoring must not land inside the user message the reply repeats."""
    template = (assets_dir / "chat_templates" / "llama.cpp" / "Qwen-Qwen3-0.6B.jinja").read_text()
    tok = _family_tokenizer(assets_dir, "qwen", template)
    messages = [{"role": "user", "content": "Say OK"}, {"role": "assistant", "content": "OK", "reasoning_content": "r"},
                {"role": "user", "content": "Again OK"}, {"role": "assistant", "content": "OK"}]
    ids, mask = encode_conversation({"messages": messages}, tok, chat_template=template)
    text_before_first_run = tok.decode(ids[: mask.index(1)])
    assert text_before_first_run.endswith("Say OK<|im_end|>\n<|im_start|>assistant\n")
    assert [tok.decode(r) for r in _runs(ids, mask)] == ["OK<|im_end|>", "<think>\n\n</think>\n\nOK<|im_end|>"]


def test_end_of_turn_written_only_between_turns(assets_dir):
    """Apertus writes <|assistant_end|> only when another turn follows: it is trained there (also without a
    system message); a numbered, non-special header between turns is never trained."""
    template = (assets_dir / "chat_templates" / "llama.cpp" / "Apertus-8B-Instruct.jinja").read_text()
    tok = _family_tokenizer(assets_dir, "apertus", template)
    ids, mask = encode_conversation({"messages": CONVERSATION[1:5]}, tok, chat_template=template)
    assert [tok.decode(r) for r in _runs(ids, mask)] == ["Hello! How can I help?<|assistant_end|>", "It is 4."]
    rounds = ("{% for m in messages %}{% if m.role == 'user' %}[Round {{ loop.index0 // 2 + 1 }}]\nQ: {{ m.content }}"
              "\n{% else %}A: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    ids, mask = encode_conversation({"messages": CONVERSATION[1:5]}, tok, chat_template=rounds)
    # (" Hello" is one token straddling the prompt's trailing space: a token overlapping the turn is trained)
    assert [tok.decode(r) for r in _runs(ids, mask)] == [" Hello! How can I help?", " It is 4."]


# Tool-calling data that a template cannot render raises a one-line DataError; these are the reasons.
TOOL_DATA_UNSUPPORTED = {
    # these render only a message's first tool call: chat.py refuses the row rather than drop the others
    "llama.cpp/GigaChat3-10B-A1.8B.jinja": "renders one tool call per message (a row has two)",
    "llama.cpp/GigaChat3.1-10B-A1.8B.jinja": "renders one tool call per message (a row has two)",
    "axolotl/deepseek_v3.jinja": "expects tool-call arguments as a JSON string",
    "llama.cpp/meetkai-functionary-medium-v3.2.jinja": "expects tool-call arguments as a JSON string",
    "llama.cpp/llama-cpp-deepseek-r1.jinja": "template bug: tojson of a generator",
    "axolotl/mistral_v2v3.jinja": "requires 9-character tool-call ids (the datasets have none)",
    "axolotl/mistral_v3_tekken.jinja": "requires 9-character tool-call ids",
    "llama.cpp/Mistral-Small-3.2-24B-Instruct-2506.jinja": "requires 9-character tool-call ids",
    "llama.cpp/mistralai-Mistral-Nemo-Instruct-2407.jinja": "requires 9-character tool-call ids",
    "llama.cpp/unsloth-Apriel-1.5.jinja": "requires tool-call ids",
    "llama.cpp/Kimi-K2-Thinking.jinja": "uses list.append, which the sandboxed Jinja forbids",
    "axolotl/llama3_2_vision.jinja": "one tool call per message only (a row has two)",
    "llama.cpp/meta-llama-Llama-3.1-8B-Instruct.jinja": "one tool call per message only (a row has two)",
    "llama.cpp/meta-llama-Llama-3.2-3B-Instruct.jinja": "one tool call per message only (a row has two)",
}


@pytest.fixture(scope="module")
def tool_conversations(assets_dir):
    from sftjax.data.formats import to_conversation
    from sftjax.data.sources import iter_rows

    out = []
    for relative in ("glaive_toolcall_en_demo.json", "reason_tool_use_demo_50.jsonl"):
        rows = iter_rows(str(assets_dir / "datasets" / "tool_calling" / relative))
        out += [to_conversation(row) for _, (_, row) in zip(range(5), rows)]
    return out


def _tool_template_names():
    import os
    import pathlib
    root = pathlib.Path(os.environ.get("SFTJAX_ASSETS", pathlib.Path(__file__).resolve().parents[3]
                                       / "shared" / "assets")) / "chat_templates"
    names = [n for n in _template_names() if n not in UNSUPPORTED and (root / n).is_file()
             and "tool" in (root / n).read_text()]  # templates with no notion of tools are not asked to render them
    return names or ["<no assets>"]


@pytest.mark.parametrize("name", _tool_template_names())
def test_tool_calling_conversations(assets_dir, tool_conversations, name):
    """Real tool-calling rows: ids equal transformers', every assistant turn (text or tool call) is one trained
    run holding its content / call, tool results are never trained."""
    template = (assets_dir / "chat_templates" / name).read_text()
    tok = _family_tokenizer(assets_dir, name, template)
    failures = 0
    for conv in tool_conversations:
        try:
            ids, mask = encode_conversation(conv, tok, chat_template=template)
        except DataError as err:
            assert name in TOOL_DATA_UNSUPPORTED and "\n" not in str(err), str(err)
            failures += 1
            continue
        reference = tok.apply_chat_template(conv["messages"], tools=conv.get("tools"), chat_template=template,
                                            tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=bool(GENERATION_TAG.search(template)))
        assert ids == list(reference["input_ids"])
        runs = [tok.decode(r) for r in _runs(ids, mask)]
        assistants = [m for m in conv["messages"] if m["role"] == "assistant"]
        assert len(runs) == len(assistants)
        for k, (run, message) in enumerate(zip(runs, assistants)):
            assert message["content"].strip()[:40] in run
            without_calls = [dict(m) for m in conv["messages"]]
            without_calls[conv["messages"].index(message)].pop("tool_calls", None)
            try:
                renders_calls = tok.apply_chat_template(without_calls, tools=conv.get("tools"),
                                                        chat_template=template, tokenize=False) != tok.decode(ids)
            except Exception:  # the template insists on the call
                renders_calls = True
            for call in message.get("tool_calls", []) if renders_calls else []:  # some templates drop calls
                assert call["function"]["name"] in run
        for message in conv["messages"]:
            if message["role"] == "tool":
                assert not any(message["content"][:60] in run for run in runs)
    assert (failures > 0) == (name in TOOL_DATA_UNSUPPORTED)
