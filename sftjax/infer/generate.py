"""Text generation with a Decoder: ``generate(...)`` and the ``sftjax generate`` command.

Design: the decoder has no KV cache, so decoding recomputes the forward pass over a fixed buffer. The buffer length
is the prompt plus ``max_new_tokens``, rounded up to a bucket so that different prompts reuse one compiled program.
The whole decode loop is a single jitted ``lax.while_loop``: each step runs the causal forward over the buffer (the
not-yet-written tail is invisible to earlier positions), projects only the hidden state of the last written
position onto the vocabulary, picks the next token (argmax, or temperature + top-p sampling) and stops at any stop
token. Prompt length, temperature and top-p are traced values, so none of them triggers a recompile.

Stop tokens are the tokenizer's and the model's EOS ids plus the chat template's end-of-turn token, found by
rendering a one-turn conversation and taking the first token after the assistant's text (so no model family's
format is hard-coded here).
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from sftjax.errors import ConfigError, DataError

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
    import jax
    import jax.numpy as jnp

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


def _attend_to_cache(q_THD, k_LKD, v_LKD, query_positions_T, *, sliding_window, softcap, scale):
    """Attention of T new queries over the cache (causal by position, optional window); f32 scores."""
    import jax
    import jax.numpy as jnp

    length, kv_heads, head_dim = k_LKD.shape
    queries, heads = q_THD.shape[0], q_THD.shape[1]
    q = q_THD.astype(jnp.float32).reshape(queries, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("tkgd,lkd->tkgl", q, k_LKD.astype(jnp.float32)) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    key_positions = jnp.arange(length)[None, :]
    visible = key_positions <= query_positions_T[:, None]
    if sliding_window is not None:
        visible &= (query_positions_T[:, None] - key_positions) < sliding_window
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgl,lkd->tkgd", probs, v_LKD.astype(jnp.float32))
    return out.reshape(queries, heads * head_dim).astype(q_THD.dtype)


def cached_forward(model, tokens_T, start, cache):
    """Hidden states [T, D] of tokens at positions start..start+T-1, reading and extending the KV cache.

    ``cache`` is a tuple of (k [L, Hkv, Dh], v) per layer; the new keys/values are written at ``start``. This
    mirrors ``Decoder.hidden_states`` layer by layer (tests check the logits agree) for one sequence.
    """
    import jax
    import jax.numpy as jnp

    from sftjax.models.rope import apply_rope, rope_cos_sin

    config = model.config
    length = tokens_T.shape[0]
    positions_T = start + jnp.arange(length, dtype=jnp.int32)
    x_BTD = model.embed_tokens(tokens_T[None], dtype=jnp.dtype(config.dtype), scale=config.embedding_scale)
    cos, sin = rope_cos_sin(config, positions_T[None])
    new_cache = []
    for layer, (k_cache, v_cache) in zip(model.layers, cache):
        attn = layer.attn
        h = layer.attn_norm(x_BTD)
        q = attn.q_proj(h).reshape(1, length, attn.num_heads, attn.head_dim)
        k = attn.k_proj(h).reshape(1, length, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(h).reshape(1, length, attn.num_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[0].astype(k_cache.dtype), (start, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[0].astype(v_cache.dtype), (start, 0, 0))
        new_cache.append((k_cache, v_cache))
        out = _attend_to_cache(q[0], k_cache, v_cache, positions_T, sliding_window=attn.sliding_window,
                               softcap=attn.softcap, scale=attn.scale)
        h = attn.o_proj(out[None])
        if layer.attn_out_norm is not None:
            h = layer.attn_out_norm(h)
        x_BTD = x_BTD + h
        h = layer.mlp(layer.mlp_norm(x_BTD))
        if layer.mlp_out_norm is not None:
            h = layer.mlp_out_norm(h)
        x_BTD = x_BTD + h
    return model.norm(x_BTD)[0], tuple(new_cache)


def empty_cache(config, length: int):
    import jax.numpy as jnp

    shape = (length, config.num_kv_heads, config.head_dim)
    return tuple((jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)) for _ in range(config.num_layers))


def head_logits(model, hidden_D):
    """float32 logits [V] of one final hidden state [D] (the decoder's head, soft-capped like training)."""
    from pallas_kernels.cross_entropy.api import project_logits

    head_DV = model.head_weight()
    return project_logits(hidden_D[None], head_DV.astype(hidden_D.dtype),
                          logit_softcap=model.config.final_logit_softcap)[0]


def _decode_loop(graphdef, state, tokens_L, prompt_length, end, stop_ids, temperature, top_p, key, *, greedy,
                 prefill_length, use_cache):
    """Fill tokens_L[prompt_length:end] one token at a time; returns (tokens_L, first unwritten position)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, state)
    length = tokens_L.shape[0]

    def pick(hidden_D, position):
        logits_V = head_logits(model, hidden_D)
        return pick_token(logits_V, jax.random.fold_in(key, position), temperature, top_p, greedy)

    def keep_going(carry):
        return (carry[0] < end) & ~carry[2]

    if not use_cache:
        positions_BL = jnp.arange(length, dtype=jnp.int32)[None]
        segment_ids_BL = jnp.ones((1, length), jnp.int32)

        def step(carry):
            position, tokens, _ = carry
            hidden_BLD = model.hidden_states(tokens[None], positions_BL=positions_BL, segment_ids_BL=segment_ids_BL)
            token = pick(jax.lax.dynamic_index_in_dim(hidden_BLD[0], position - 1, keepdims=False), position)
            return position + 1, tokens.at[position].set(token), jnp.any(token == stop_ids)

        position, tokens, _ = jax.lax.while_loop(keep_going, step, (prompt_length, tokens_L, jnp.bool_(False)))
        return tokens, position

    # prefill: the (bucket-padded) prompt in one pass; padding writes cache rows that are overwritten before use
    hidden_TD, cache = cached_forward(model, tokens_L[:prefill_length], 0, empty_cache(model.config, length))
    token = pick(jax.lax.dynamic_index_in_dim(hidden_TD, prompt_length - 1, keepdims=False), prompt_length)
    tokens_L = tokens_L.at[prompt_length].set(token)

    def cached_step(carry):
        position, tokens, _, cache = carry
        previous = jax.lax.dynamic_slice(tokens, (position - 1,), (1,))
        hidden_TD, cache = cached_forward(model, previous, position - 1, cache)
        token = pick(hidden_TD[0], position)
        return position + 1, tokens.at[position].set(token), jnp.any(token == stop_ids), cache

    carry = (prompt_length + 1, tokens_L, jnp.any(token == stop_ids), cache)
    position, tokens, _, _ = jax.lax.while_loop(keep_going, cached_step, carry)
    return tokens, position


@functools.cache
def _jitted_decode_loop():
    """Built on first use so that importing this module (the CLI does) does not import jax."""
    import jax

    return jax.jit(_decode_loop, static_argnames=("graphdef", "greedy", "prefill_length", "use_cache"))


def generate_ids(model, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, stop_ids: Sequence[int] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool | None = None
                 ) -> list[int]:
    """New token ids after ``prompt_ids`` (the stop token, if reached, is included as the last id).

    ``use_cache`` (default: on, except for RoPE types whose frequencies depend on the sequence length) decodes
    with a KV cache; off, every step recomputes the forward pass over the whole buffer.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sftjax.models.scan import unstacked

    model = unstacked(model)  # the KV-cache decoder runs one module per layer

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    prompt_length = len(prompt_ids)
    if prompt_length == 0:
        raise DataError("generate: the prompt is empty")
    end = prompt_length + max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and end > limit:
        raise ConfigError(f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                          f"model's max_position_embeddings ({limit})")
    length = -(-end // _BUCKET) * _BUCKET
    buffer = np.zeros(length, np.int32)
    buffer[:prompt_length] = prompt_ids
    stops = np.asarray(list(stop_ids) or [-1], np.int32)
    if use_cache is None:
        use_cache = getattr(model.config, "rope_type", "default") not in ("dynamic", "longrope")
    prefill_length = min(-(-prompt_length // _BUCKET) * _BUCKET, length)
    graphdef, state = nnx.split(model)
    tokens, stop = _jitted_decode_loop()(
        graphdef, state, jnp.asarray(buffer), jnp.int32(prompt_length), jnp.int32(end), jnp.asarray(stops),
        jnp.float32(temperature), jnp.float32(top_p), jax.random.key(seed), greedy=temperature == 0.0,
        prefill_length=prefill_length, use_cache=use_cache)
    return np.asarray(tokens)[prompt_length:int(stop)].tolist()


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
    from sftjax.models.loading import load_model, load_tokenizer

    model, _ = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    answer = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      chat_template=args.chat_template, system=args.system)
    print(answer)
    return 0
