"""Chat: the prompts a session feeds the model equal transformers' ``apply_chat_template`` of the whole history,
its (streamed) replies equal ``sftjax.infer.generate.generate`` on the same messages, /reset forgets, a tiny context
drops the oldest turns, and the ``sftjax chat`` command end to end on the real SmolLM2 GGUF."""

from __future__ import annotations

import io
import re

import pytest

from tests.conftest import error_line
from flax import nnx

from sftjax.infer import generate as gen
from sftjax.infer.chat import ChatSession
from sftjax.errors import ConfigError, DataError

QUESTION_1 = "What is the capital of France?"
QUESTION_2 = "And the capital of Italy? Also name one famous landmark there, please."
NEW_TOKENS = 10


def _reference_ids(tokenizer, messages):
    """Independent reference: transformers renders and tokenizes the conversation itself."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from sftjax.models.loading import load_model
    from sftjax.models.tokenizer import load_tokenizer

    model, _ = load_model(smollm2_gguf)
    return model, load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def reference_replies(smollm2):
    """The two replies of the two-turn conversation, from ``generate`` (its own jitted decode loop)."""
    model, tokenizer = smollm2
    first = gen.generate(model, tokenizer, QUESTION_1, max_new_tokens=NEW_TOKENS)
    history = [{"role": "user", "content": QUESTION_1}, {"role": "assistant", "content": first},
               {"role": "user", "content": QUESTION_2}]
    second = gen.generate(model, tokenizer, history, max_new_tokens=NEW_TOKENS)
    return first, second


def test_two_turns_render_the_history_and_match_generate(smollm2, reference_replies):
    model, tokenizer = smollm2
    session = ChatSession(model, tokenizer, max_new_tokens=NEW_TOKENS)
    pieces = []
    first = session.send(QUESTION_1, on_text=pieces.append)
    assert first == reference_replies[0] and first.strip()
    assert "".join(pieces) == first and len(pieces) > 1  # streamed token by token
    assert session.last_prompt_ids == _reference_ids(tokenizer, [{"role": "user", "content": QUESTION_1}])

    second = session.send(QUESTION_2)
    history = [{"role": "user", "content": QUESTION_1}, {"role": "assistant", "content": first},
               {"role": "user", "content": QUESTION_2}]
    assert session.last_prompt_ids == _reference_ids(tokenizer, history)
    assert len(session.last_prompt_ids) > 64  # the prompt spans two prefill chunks
    assert second == reference_replies[1]
    assert session.history == history + [{"role": "assistant", "content": second}]


def test_reset_forgets_and_system_is_kept(smollm2):
    model, tokenizer = smollm2
    system = "You answer in one word."
    session = ChatSession(model, tokenizer, system=system, max_new_tokens=3)
    session.send("Name a fruit.")
    session.send("Another one?")
    session.reset()
    assert session.history == [{"role": "system", "content": system}]
    after_reset = session.send("Name a color.")
    fresh = ChatSession(model, tokenizer, system=system, max_new_tokens=3)
    assert fresh.send("Name a color.") == after_reset
    assert session.last_prompt_ids == fresh.last_prompt_ids == _reference_ids(
        tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": "Name a color."}])

    session.set_system("Be brief.")  # a new system message starts over too
    assert session.history == [{"role": "system", "content": "Be brief."}]


# ---------------------------------------------------------------------------------------------------------------
# A tiny random model with a 64-token context


@pytest.fixture(scope="module")
def tiny(assets_dir):
    from transformers import AutoTokenizer

    from sftjax.models.config import ModelConfig
    from sftjax.models.decoder import Decoder

    tokenizer = AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Decoder(config, rngs=nnx.Rngs(0)), tokenizer


def test_long_conversation_drops_the_oldest_turns(tiny, capsys):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, system="S", max_new_tokens=6)
    questions = [f"question number {i}" for i in range(6)]
    for question in questions:
        session.send(question)
        assert len(session.last_prompt_ids) + 6 <= 64
        assert session.last_prompt_ids == _reference_ids(tokenizer, session.history[:-1])
    history = session.history
    assert history[0] == {"role": "system", "content": "S"}
    assert history[1]["role"] == "user" and history[1]["content"] != questions[0]
    assert [m["content"] for m in history if m["role"] == "user"][-1] == questions[-1]
    notes = capsys.readouterr().err.splitlines()
    assert any(re.search(r"dropped the \d+ oldest turn", note) for note in notes)
    assert all(note.startswith("sftjax chat:") for note in notes)


def test_message_too_long_for_the_context(tiny, capsys):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_new_tokens=8)
    session.send("hello")
    before = session.history
    with pytest.raises(DataError) as error:
        session.send("word " * 80)
    assert "\n" not in str(error.value) and "64" in str(error.value)
    assert session.history == before  # nothing lost, nothing half-added

    # a message that leaves less room than max_new_tokens gets a shorter reply and a note
    message = next(m for m in (" ".join(["a"] * n) for n in range(1, 64))
                   if len(_reference_ids(tokenizer, [{"role": "user", "content": m}])) == 64 - 3)
    reply_ids = tokenizer(session.send(message), add_special_tokens=False)["input_ids"]
    assert len(session.last_prompt_ids) + 3 == 64 and len(session.history) == 2  # the "hello" turn was dropped
    assert "limited to 3 tokens" in capsys.readouterr().err
    assert len(reply_ids) <= 3


def test_sampled_first_reply_equals_generate_with_the_seed(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_new_tokens=8, temperature=0.9, top_p=0.8, seed=5)
    reply = session.send("hi")
    assert reply == gen.generate(model, tokenizer, "hi", max_new_tokens=8, temperature=0.9, top_p=0.8, seed=5)


def test_dynamic_rope_replies_come_from_generate_without_cache(tiny):
    """RoPE that depends on the sequence length cannot use the KV cache: replies come whole, still right."""
    _, tokenizer = tiny
    from sftjax.models.decoder import Decoder

    config = tiny[0].config.replace(rope_type="dynamic", rope_factor=2.0, max_position_embeddings=128)
    model = Decoder(config, rngs=nnx.Rngs(2))
    session = ChatSession(model, tokenizer, max_new_tokens=5)
    pieces = []
    first = session.send("hi", on_text=pieces.append)
    assert not session.use_cache and "".join(pieces) == first
    assert first == tokenizer.decode(gen.generate_ids(model, session.last_prompt_ids, max_new_tokens=5,
                                                      stop_ids=session.stop_ids, use_cache=False),
                                     skip_special_tokens=True)
    session.send("and?")
    assert session.last_prompt_ids == _reference_ids(tokenizer, session.history[:-1])


def test_bad_settings_are_one_line_errors(tiny, assets_dir):
    from transformers import PreTrainedTokenizerFast

    model, tokenizer = tiny
    plain = PreTrainedTokenizerFast(tokenizer_file=str(assets_dir / "tokenizers" / "gpt2" / "tokenizer.json"))
    for kwargs, tok in (({}, plain), ({"max_new_tokens": 64}, tokenizer), ({"top_p": 0.0}, tokenizer),
                        ({"chat_template": "/no/such/template.jinja"}, tokenizer)):
        with pytest.raises(ConfigError) as error:
            ChatSession(model, tok, **kwargs)
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# The command line


def test_cli_chat_end_to_end(smollm2_gguf, reference_replies, monkeypatch, capsys):
    from sftjax.cli import main

    lines = f"{QUESTION_1}\n\n{QUESTION_2}\n/bogus\n/reset\n{QUESTION_1}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", str(smollm2_gguf), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    captured = capsys.readouterr()
    first, second = reference_replies
    assert captured.out == f"{first}\n{second}\n{first}\n"  # replies only; the third follows /reset
    assert str(smollm2_gguf) in captured.err and "/reset" in captured.err and "unknown command /bogus" in captured.err


def test_cli_exit_stops_reading(tmp_path, assets_dir, monkeypatch, capsys):
    """A saved tiny model: /exit ends the session before the next line; a bad --top-p is a one-line error."""
    import shutil

    from sftjax.cli import main
    from sftjax.models.config import ModelConfig
    from sftjax.models.decoder import Decoder
    from sftjax.models.loading import load_model, save_model
    from sftjax.models.tokenizer import load_tokenizer

    config = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)
    out = save_model(Decoder(config, rngs=nnx.Rngs(1)), config, tmp_path / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets_dir / "tokenizers" / "smollm2" / name, out / name)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\nnever sent\n"))
    assert main(["chat", str(out), "--max-new-tokens", "4", "--system", "S"]) == 0
    printed = capsys.readouterr().out
    model, _ = load_model(out)
    tokenizer = load_tokenizer(out)
    assert printed == gen.generate(model, tokenizer, "hi", max_new_tokens=4, system="S") + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(out), "--top-p", "0"]) == 2
    error_line(capsys.readouterr().err)
