"""Multi-turn chat with a model: ``ChatSession`` and the ``sftjax chat`` command.

Design, in plain words:

* The conversation is a list of messages (an optional system message, then user and assistant turns). Every
  turn renders the whole conversation with the chat template (the tokenizer's own, or one the user names) plus the
  generation prompt, and decodes the answer; the answer becomes an assistant turn rendered by the same template
  next time. Nothing about a model family's format is written here.
* Replies **stream**: ``generate.generate`` runs its whole decode loop inside one jitted ``lax.while_loop`` and
  only hands back the finished ids, so this module steps the same decoder decode mode (``Decoder.decode`` with
  its KV cache, the same logits projection and the same token picker and seed folding, so a greedy or seeded
  reply equals ``generate``'s) from Python, one token at a time. A jitted prefill over fixed 64-token chunks and a jitted one-token step
  return each token to Python, where it is detokenized and passed to ``on_text`` as soon as it forms whole
  characters. Models whose RoPE depends on the sequence length (dynamic, longrope) cannot use the cache; their
  replies come from ``generate_ids`` in one piece.
* The KV cache length grows in powers of two (at least 256, at most the model's context), so a growing
  conversation compiles the two small programs a handful of times, not at every 64 tokens.
* When the conversation plus ``max_new_tokens`` would not fit the model's ``max_position_embeddings``, the oldest
  user turns (each with its replies) are dropped, the system message is kept, and a one-line note goes to stderr.
  If the new message alone leaves too little room, the reply is shortened to the room left; if there is no room
  at all, ``send`` raises a one-line DataError and the conversation is unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftjax.errors import ConfigError, DataError, SftjaxError
from sftjax.infer import generate as gen
from sftjax.models.loading import load_model
from sftjax.models.scan import unstacked
from sftjax.models.tokenizer import load_tokenizer

_PREFILL_CHUNK = 64
_MIN_CACHE = 256
_COMMANDS = "/reset (forget the conversation), /system TEXT (new system message, resets), /exit or EOF (quit)"


def _note(text: str) -> None:
    print(f"sftjax chat: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Decoding one token at a time (so that tokens can be shown as they come)


def _prefill_chunk(graphdef, state, tokens_T, start, cache, pick_index, key, temperature, top_p, *, greedy):
    """Write a chunk of prompt tokens into the cache; also the token that would follow position start+pick_index."""
    model = nnx.merge(graphdef, state)
    positions_1T = (start + jnp.arange(tokens_T.shape[0], dtype=jnp.int32))[None]
    hidden_1TD, cache = model.decode(tokens_T[None], positions_1T, cache)
    hidden_D = jax.lax.dynamic_index_in_dim(hidden_1TD[0], pick_index, keepdims=False)
    position = start + pick_index + 1  # where the picked token goes (generate folds the key the same way)
    token = gen.pick_token(gen.head_logits(model, hidden_D), jax.random.fold_in(key, position), temperature, top_p,
                            greedy)
    return token, cache


def _decode_step(graphdef, state, previous_1, position, cache, key, temperature, top_p, *, greedy):
    """Feed the token at ``position - 1``; returns the token for ``position`` and the extended cache."""
    model = nnx.merge(graphdef, state)
    hidden_11D, cache = model.decode(previous_1[None], (position - 1)[None, None], cache)
    token = gen.pick_token(gen.head_logits(model, hidden_11D[0, 0]), jax.random.fold_in(key, position), temperature,
                            top_p, greedy)
    return token, cache


_JIT_OPTIONS = {"static_argnames": ("graphdef", "greedy"), "donate_argnames": ("cache",)}
_prefill = jax.jit(_prefill_chunk, **_JIT_OPTIONS)
_step = jax.jit(_decode_step, **_JIT_OPTIONS)


def _cache_length(needed: int, limit: int | None) -> int:
    length = max(_MIN_CACHE, 1 << (needed - 1).bit_length())
    if limit:
        length = min(length, -(-limit // _PREFILL_CHUNK) * _PREFILL_CHUNK)
    return max(length, needed)


class _TextStream:
    """Turns a growing list of token ids into new text pieces, holding back incomplete characters."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text, self.shown = tokenizer, on_text, ""

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, ids: list[int], final: bool = False) -> str:
        text = self.text(ids)
        if self.on_text is not None and text.startswith(self.shown) and (final or not text.endswith("\ufffd")):
            if len(text) > len(self.shown):
                self.on_text(text[len(self.shown):])
            self.shown = text
        return text


# --------------------------------------------------------------------------------------------------------------
# The session


class ChatSession:
    """A conversation with ``model``: ``send(text)`` returns the reply and keeps both turns in ``history``."""

    def __init__(self, model, tokenizer, *, system: str | None = None, chat_template=None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat: the tokenizer has no chat template; pass one with --chat-template FILE "
                              "(or chat_template=...)")
        self.model = unstacked(model)  # the KV-cache decoder runs one module per layer
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.context_limit = getattr(self.model.config, "max_position_embeddings", None)
        if self.context_limit and max_new_tokens >= self.context_limit:
            raise ConfigError(f"max_new_tokens ({max_new_tokens}) must be smaller than the model's "
                              f"max_position_embeddings ({self.context_limit})")
        self.stop_ids = gen.stop_token_ids(tokenizer, self.model.config, chat_template=chat_template)
        self.use_cache = gen.uses_cache(self.model.config)
        self.system = system
        self._turns: list[dict] = []
        self._replies = 0
        self.last_prompt_ids: list[int] = []  # what the last send() fed the model (tests and debugging)
        self.last_reply_complete = True  # False when the last reply hit max_new_tokens before a stop token

    @property
    def history(self) -> list[dict]:
        """The conversation the model sees next turn: the system message (if any), then user/assistant turns."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + [dict(turn) for turn in self._turns]

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self._turns = []
        self._replies = 0

    def set_system(self, system: str | None) -> None:
        """A new system message (None removes it); the conversation starts over."""
        self.system = system
        self.reset()

    def send(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's reply to ``user_text`` given the conversation so far; ``on_text`` gets it piece by piece."""
        turns = self._turns + [{"role": "user", "content": user_text}]
        prompt_ids, turns, dropped = self._fit(turns)
        room = (self.context_limit - len(prompt_ids)) if self.context_limit else self.max_new_tokens
        max_new_tokens = min(self.max_new_tokens, room)
        if max_new_tokens < 1:
            raise DataError(f"chat: the message does not fit: the prompt is {len(prompt_ids)} tokens and the model's "
                            f"context (max_position_embeddings) is {self.context_limit}")
        if dropped:
            _note(f"dropped the {dropped} oldest turn(s) to fit the model's context of {self.context_limit} tokens")
        if max_new_tokens < self.max_new_tokens:
            _note(f"this reply is limited to {max_new_tokens} tokens by the model's context of "
                  f"{self.context_limit} tokens")
        self.last_prompt_ids = prompt_ids
        stream = _TextStream(self.tokenizer, on_text)
        new_ids = self._decode(prompt_ids, max_new_tokens, stream)
        self.last_reply_complete = bool(new_ids) and new_ids[-1] in self.stop_ids
        if self.last_reply_complete:
            new_ids = new_ids[:-1]
        reply = stream.update(new_ids, final=True)
        self._turns = turns + [{"role": "assistant", "content": reply}]
        self._replies += 1
        return reply

    # ----------------------------------------------------------------------------------------------------------

    def _render(self, turns: list[dict]) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return gen.render_prompt_ids(self.tokenizer, system + turns, chat_template=self.chat_template)

    def _fit(self, turns: list[dict]) -> tuple[list[int], list[dict], int]:
        """Prompt ids of the conversation, after dropping the oldest user turns (with their replies) to fit."""
        dropped = 0
        while True:
            prompt_ids = self._render(turns)
            if not self.context_limit or len(prompt_ids) + self.max_new_tokens <= self.context_limit:
                return prompt_ids, turns, dropped
            next_user = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), None)
            if next_user is None:  # only the new message is left: send() shortens or refuses the reply
                return prompt_ids, turns, dropped
            turns, dropped = turns[next_user:], dropped + 1

    def _decode(self, prompt_ids: list[int], max_new_tokens: int, stream: _TextStream) -> list[int]:
        greedy = self.temperature == 0.0
        if not self.use_cache:
            new_ids = gen.generate_ids(self.model, prompt_ids, max_new_tokens=max_new_tokens,
                                       stop_ids=self.stop_ids, temperature=self.temperature, top_p=self.top_p,
                                       seed=self.seed + self._replies, use_cache=False)
            stream.update([i for i in new_ids if i not in self.stop_ids])
            return new_ids
        prefill, step = _prefill, _step
        prompt_length = len(prompt_ids)
        padded = -(-prompt_length // _PREFILL_CHUNK) * _PREFILL_CHUNK
        cache = self.model.init_cache(1, _cache_length(max(prompt_length + max_new_tokens, padded), self.context_limit))
        buffer = np.zeros(padded, np.int32)
        buffer[:prompt_length] = prompt_ids
        graphdef, state = nnx.split(self.model)
        # each reply gets its own key: the first equals generate(seed=seed), later ones differ from it
        key = jax.random.key(self.seed + self._replies)
        sampling = {"temperature": jnp.float32(self.temperature), "top_p": jnp.float32(self.top_p), "greedy": greedy}
        token = None
        for start in range(0, padded, _PREFILL_CHUNK):
            pick_index = min(prompt_length - 1 - start, _PREFILL_CHUNK - 1)
            token, cache = prefill(graphdef, state, jnp.asarray(buffer[start:start + _PREFILL_CHUNK]),
                                   jnp.int32(start), cache, jnp.int32(pick_index), key, **sampling)
        new_ids = [int(token)]
        position = prompt_length + 1
        while new_ids[-1] not in self.stop_ids and len(new_ids) < max_new_tokens:
            stream.update(new_ids)
            token, cache = step(graphdef, state, jnp.asarray([new_ids[-1]], jnp.int32), jnp.int32(position),
                                cache, key, **sampling)
            new_ids.append(int(token))
            position += 1
        return new_ids


# --------------------------------------------------------------------------------------------------------------
# Command line: sftjax chat MODEL


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a model directory (HF format or a training run's final/), a .gguf file, "
                                      "or an alias such as smollm2-135m-instruct")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", default=None, help="a Jinja template file or inline template")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's own)")


def _read_lines(interactive: bool):
    """User lines: with a prompt and line editing on a terminal, plain line by line otherwise (scripts, pipes)."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                yield input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        while True:
            line = sys.stdin.readline()
            if not line:
                return
            yield line


def run(args) -> int:
    """Reads user lines from stdin and prints each reply to stdout as it is produced; notes go to stderr."""
    model, _ = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    session = ChatSession(model, tokenizer, system=args.system, chat_template=args.chat_template,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed)
    interactive = sys.stdin.isatty()
    print(f"sftjax chat with {args.model} (context {session.context_limit} tokens). Commands: {_COMMANDS}",
          file=sys.stderr, flush=True)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    for line in _read_lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                session.reset()
                _note("conversation cleared")
            elif command == "/system":
                session.set_system(rest.strip() or None)
                _note("system message " + ("set" if rest.strip() else "removed") + "; conversation cleared")
            else:
                _note(f"unknown command {command}; commands: {_COMMANDS}")
            continue
        try:
            session.send(text, on_text=show)
        except KeyboardInterrupt:
            if not interactive:
                raise
            print(file=sys.stdout, flush=True)
            _note("reply interrupted; it is not part of the conversation")
            continue
        except SftjaxError as error:
            print(f"sftjax: error: {error}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        if not session.last_reply_complete:
            _note(f"the reply was cut at --max-new-tokens {session.max_new_tokens}")
    return 0
