"""Text generation with a Decoder: ``generate(...)``, ``generate_batch_ids(...)`` and the ``sftjax generate`` command.

Design: decoding runs the model's own layers in decode mode (``Decoder.decode`` with a KV cache; see
``sftjax.models.decoder``), so there is one forward for training and generation. A batch of prompts (right-padded
into one [B, S] buffer, S = the longest prompt plus ``max_new_tokens``, rounded up to a bucket so that different
prompts reuse one compiled program) is decoded by a single jitted ``lax.while_loop``: one prefill pass over the
prompts writes the cache, then each step feeds every row's last token at that row's own position, projects its
hidden state onto the vocabulary, picks the next token (argmax, or temperature + top-p sampling) and stops the row
at a stop token or its length limit; the loop ends when every row is done. Prompt lengths, temperature and top-p
are traced values, so none of them triggers a recompile. Models whose RoPE frequencies depend on the sequence
length (``dynamic``, ``longrope``) cannot reuse cached keys; they recompute the forward over the buffer each step,
one row at a time.

Stop tokens are the tokenizer's and the model's EOS ids plus the chat template's end-of-turn token, found by
rendering a one-turn conversation and taking the first token after the assistant's text (so no model family's
format is hard-coded here).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftjax.errors import ConfigError, DataError
from sftjax.models.loading import load_model
from sftjax.models.scan import unstacked
from sftjax.models.tokenizer import load_tokenizer

_BUCKET = 64
_MARKER = "Xq7zSftjaxMarker"


# --------------------------------------------------------------------------------------------------------------
# Prompt rendering


def _read_template(chat_template: str | os.PathLike | None) -> str | None:
    """A template given as a file path or inline Jinja text."""
    if chat_template is None:
        return None
    text = os.fspath(chat_template)
    if "{" not in text:
        path = pathlib.Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"chat_template: {text} is neither a Jinja template nor an existing file")
        text = path.read_text()
    return text


def _as_messages(prompt_or_messages, system: str | None) -> list[dict]:
    if isinstance(prompt_or_messages, str):
        messages = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = [dict(m) for m in prompt_or_messages]
        for index, message in enumerate(messages):
            if "role" not in message or "content" not in message:
                raise DataError(f"messages[{index}]: each message needs 'role' and 'content' keys")
    if system is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_prompt_ids(tokenizer, prompt_or_messages, *, chat_template=None, system: str | None = None) -> list[int]:
    """Token ids of the prompt: chat-rendered (with the generation prompt) when a template is available.

    The rendered text already holds whatever BOS the template wants, so it is tokenized without special tokens.
    A plain string with no template anywhere is tokenized as raw text (with the tokenizer's own BOS).
    """
    template = _read_template(chat_template)
    has_template = template is not None or getattr(tokenizer, "chat_template", None)
    if not has_template:
        if not isinstance(prompt_or_messages, str):
            raise DataError("generate: messages were given but the tokenizer has no chat template "
                            "(pass chat_template=...)")
        return list(tokenizer(prompt_or_messages)["input_ids"])
    messages = _as_messages(prompt_or_messages, system)
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as error:  # jinja errors: raise_exception() in templates, undefined variables...
        raise DataError(f"chat template failed to render the prompt: {' '.join(str(error).split())}") from error
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer, model_config=None, *, chat_template=None) -> list[int]:
    """EOS ids (tokenizer and model) plus the template's end-of-turn token when it is a special token."""
    stops: list[int] = []

    def add(value):
        if value is None:
            return
        for token_id in (value if isinstance(value, (list, tuple)) else [value]):
            if token_id is not None and int(token_id) not in stops:
                stops.append(int(token_id))

    add(getattr(tokenizer, "eos_token_id", None))
    if model_config is not None:
        add(getattr(model_config, "eos_token_id", None))
    template = _read_template(chat_template) or getattr(tokenizer, "chat_template", None)
    if template:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}],
                chat_template=template, tokenize=False)
        except Exception:  # a template that cannot render this probe just adds no stop token
            text = ""
        if _MARKER in text:
            after = text.split(_MARKER, 1)[1]
            ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
            if ids and (ids[0] in special or ids[0] in added):
                add(ids[0])
    return stops


# --------------------------------------------------------------------------------------------------------------
# Decoding


def pick_token(logits_V, key, temperature, top_p, greedy: bool):
    """The next token from logits [V]: argmax, or a temperature + nucleus (top-p) sample with ``key``."""
    if greedy:
        return jnp.argmax(logits_V).astype(jnp.int32)
    scaled = logits_V / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    probs = jax.nn.softmax(sorted_logits)
    mass_before = jnp.cumsum(probs) - probs
    keep = mass_before < top_p  # always keeps the most likely token
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
    return order[choice].astype(jnp.int32)


def head_logits(model, hidden_D):
    """float32 logits [V] of one final hidden state [D] (the decoder's head, soft-capped like training)."""
    return model.logits(hidden_D[None])[0]


def uses_cache(config) -> bool:
    """Whether decoding can reuse cached keys/values (not when RoPE frequencies depend on the sequence length)."""
    return getattr(config, "rope_type", "default") not in ("dynamic", "longrope")


def _row_keys(key, rows: int):
    """One PRNG key per row; row 0 uses ``key`` itself, so a batch of one samples like ``generate``."""
    if rows == 1:
        return key[None]
    keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(rows))
    return keys.at[0].set(key)


def _decode_loop(graphdef, state, buffer_BS, lengths_B, max_new_tokens, stop_ids, temperature, top_p, key, *,
                 greedy, prefill_length, use_cache):
    """Fill each row's buffer after its prompt; returns (buffer, first unwritten position per row)."""
    model = nnx.merge(graphdef, state)
    rows, length = buffer_BS.shape
    row_keys = _row_keys(key, rows)
    end_B = jnp.minimum(lengths_B + max_new_tokens, length)
    index_B = jnp.arange(rows)

    def pick(hidden_BD, positions_B):
        """The token for position ``positions_B`` of each row, from the hidden state before it."""
        logits_BV = model.logits(hidden_BD)
        keys = jax.vmap(jax.random.fold_in)(row_keys, positions_B)
        return jax.vmap(pick_token, in_axes=(0, 0, None, None, None))(logits_BV, keys, temperature, top_p, greedy)

    def stopped(token_B):
        return jnp.any(token_B[:, None] == stop_ids[None, :], axis=1)

    def keep_going(carry):
        return ~jnp.all(carry[2])

    def written(end_B):
        """Segment 1 on the tokens written so far, padding after: RoPE scaled by the length seen (as an uncached
        forward over exactly those tokens)."""
        return (jnp.arange(length)[None, :] < end_B[:, None]).astype(jnp.int32)

    if use_cache:
        positions = jnp.broadcast_to(jnp.arange(prefill_length, dtype=jnp.int32), (rows, prefill_length))
        hidden_BTD, cache = model.decode(buffer_BS[:, :prefill_length], positions, model.init_cache(rows, length))
        last_BD = hidden_BTD[index_B, lengths_B - 1]
    else:
        hidden_BLD = model.hidden_states(buffer_BS, segment_ids_BL=written(lengths_B))
        last_BD, cache = hidden_BLD[index_B, lengths_B - 1], None
    token_B = pick(last_BD, lengths_B)
    buffer_BS = buffer_BS.at[index_B, lengths_B].set(token_B)
    position_B = lengths_B + 1
    done_B = stopped(token_B) | (position_B >= end_B)

    def step(carry):
        position_B, buffer_BS, done_B, cache = carry
        feed_B = jnp.minimum(position_B, length) - 1  # done rows repeat their last step, unwritten
        previous_B = buffer_BS[index_B, feed_B]
        if use_cache:
            hidden_BTD, cache = model.decode(previous_B[:, None], feed_B[:, None], cache)
            hidden_BD = hidden_BTD[:, 0]
        else:
            hidden_BD = model.hidden_states(buffer_BS, segment_ids_BL=written(position_B))[index_B, feed_B]
        token_B = pick(hidden_BD, position_B)
        write_B = jnp.minimum(position_B, length - 1)
        buffer_BS = buffer_BS.at[index_B, write_B].set(jnp.where(done_B, buffer_BS[index_B, write_B], token_B))
        new_position_B = jnp.where(done_B, position_B, position_B + 1)
        done_B = done_B | stopped(token_B) | (new_position_B >= end_B)
        return new_position_B, buffer_BS, done_B, cache

    position_B, buffer_BS, _, _ = jax.lax.while_loop(keep_going, step, (position_B, buffer_BS, done_B, cache))
    return buffer_BS, position_B


_jitted_decode_loop = jax.jit(_decode_loop, static_argnames=("graphdef", "greedy", "prefill_length", "use_cache"))


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")


def generate_batch_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                       stop_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                       use_cache: bool | None = None) -> list[list[int]]:
    """New token ids after each prompt, decoded together (the stop token, if reached, ends each list).

    ``use_cache`` (default: on, except for RoPE types whose frequencies depend on the sequence length) decodes
    with a KV cache; off, every step recomputes the forward pass over the whole buffer (one row at a time).
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise DataError(f"generate: prompt {index} is empty")
    model = unstacked(model)  # decoding runs one module per layer
    if use_cache is None:
        use_cache = uses_cache(model.config)
    if not use_cache and len(prompts) > 1:  # frequencies of these RoPE types depend on the whole batch's length
        return [generate_batch_ids(model, [p], max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                   temperature=temperature, top_p=top_p, seed=seed, use_cache=False)[0]
                for p in prompts]
    longest = max(len(p) for p in prompts)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and longest + max_new_tokens > limit:
        raise ConfigError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context of {limit} tokens (max_position_embeddings); shorten the prompt or "
                          "lower max_new_tokens")
    length = -(-(longest + max_new_tokens) // _BUCKET) * _BUCKET
    buffer = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        buffer[row, :len(prompt)] = prompt
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    stops = np.asarray(list(stop_ids) or [-1], np.int32)
    prefill_length = min(-(-longest // _BUCKET) * _BUCKET, length)
    graphdef, state = nnx.split(model)
    tokens, stop = _jitted_decode_loop(
        graphdef, state, jnp.asarray(buffer), jnp.asarray(lengths), jnp.int32(max_new_tokens), jnp.asarray(stops),
        jnp.float32(temperature), jnp.float32(top_p), jax.random.key(seed), greedy=temperature == 0.0,
        prefill_length=prefill_length, use_cache=use_cache)
    tokens, stop = np.asarray(tokens), np.asarray(stop)
    return [tokens[row, lengths[row]:int(stop[row])].tolist() for row in range(len(prompts))]


def generate_ids(model, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, stop_ids: Sequence[int] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool | None = None
                 ) -> list[int]:
    """New token ids after ``prompt_ids`` (the stop token, if reached, is included as the last id)."""
    if not len(prompt_ids):
        raise DataError("generate: the prompt is empty")
    return generate_batch_ids(model, [prompt_ids], max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                              temperature=temperature, top_p=top_p, seed=seed, use_cache=use_cache)[0]


def generate(model, tokenizer, prompt_or_messages, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat_template=None, system: str | None = None) -> str:
    """The model's answer to a prompt (a user message) or a list of chat messages, as text.

    Greedy when ``temperature == 0``; otherwise sampled with temperature and nucleus (``top_p``) filtering,
    reproducibly for a given ``seed``. Stops at EOS or the template's end-of-turn token.
    """
    prompt_ids = render_prompt_ids(tokenizer, prompt_or_messages, chat_template=chat_template, system=system)
    stops = stop_token_ids(tokenizer, getattr(model, "config", None), chat_template=chat_template)
    new_ids = generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stops,
                           temperature=temperature, top_p=top_p, seed=seed)
    if new_ids and new_ids[-1] in stops:
        new_ids = new_ids[:-1]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------------------
# Command line: sftjax generate MODEL_OR_ALIAS --prompt "..."


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a model directory (HF format), a .gguf file, or an alias such as "
                                      "smollm2-135m-instruct")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", default=None, help="an optional system message")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", default=None, help="a Jinja template file or inline template")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's own)")


def run(args) -> int:
    model, _ = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    answer = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      chat_template=args.chat_template, system=args.system)
    print(answer)
    return 0
