"""Generation: the KV-cache forward against the decoder, greedy decoding of SmolLM2 against transformers'
``generate``, stop tokens and prompt rendering from real chat templates, sampling, and the CLI."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftjax.errors import ConfigError
from sftjax.infer import generate as gen
from sftjax.models.config import SLIDING_ATTENTION, FULL_ATTENTION, ModelConfig
from sftjax.models.decoder import Decoder
from tests.conftest import require
from tests.oracle import assert_close

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5)
VARIANTS = {
    "llama_gqa_tied": ModelConfig(**TINY, tie_word_embeddings=True),
    "gemma2_like": ModelConfig(**TINY, family="gemma2", architecture="Gemma2ForCausalLM", activation="gelu_tanh",
                               sandwich_norms=True, norm_plus_one=True, embedding_scale=32 ** 0.5,
                               sliding_window=4, layer_types=(SLIDING_ATTENTION, FULL_ATTENTION),
                               attn_logit_softcap=5.0, final_logit_softcap=3.0, query_pre_attn_scalar=16.0),
    # sliding layers with their own RoPE base; full layers with another head shape, keys as values, proportional
    # RoPE, and a stored per-layer scalar: the cache holds each layer's own shape
    "gemma4_like": ModelConfig(**TINY, family="gemma4_text", architecture="Gemma4ForCausalLM", activation="gelu_tanh",
                               sandwich_norms=True, qk_norm=True, v_norm=True, layer_scalar=True,
                               embedding_scale=32 ** 0.5, sliding_window=4,
                               layer_types=(SLIDING_ATTENTION, FULL_ATTENTION),
                               sliding_rope_theta=100.0, rope_type="proportional", partial_rotary_factor=0.5,
                               global_head_dim=16, global_num_kv_heads=1, attention_k_eq_v=True,
                               query_pre_attn_scalar=1.0, final_logit_softcap=3.0),
    # Gemma 4 E2B/E4B: per-layer inputs, and the last two layers attend over layers 0's and 1's caches
    "gemma4_ple_kv_shared": ModelConfig(**dict(TINY, num_layers=4), family="gemma4_text",
                                        architecture="Gemma4ForCausalLM", activation="gelu_tanh", sandwich_norms=True,
                                        qk_norm=True, v_norm=True, layer_scalar=True, embedding_scale=32 ** 0.5,
                                        sliding_window=4, layer_types=(SLIDING_ATTENTION, FULL_ATTENTION) * 2,
                                        sliding_rope_theta=100.0, global_head_dim=16, global_num_kv_heads=1,
                                        query_pre_attn_scalar=1.0, per_layer_input_size=4, kv_shared_layers=2,
                                        double_wide_shared_mlp=True),
    "qwen3_like": ModelConfig(**TINY, family="qwen3", architecture="Qwen3ForCausalLM", qk_norm=True,
                              attention_bias=True),
    # gpt-oss's attention: sink logits, YaRN RoPE, alternating sliding/full layers, biases on q/k/v/o
    "sinks_yarn": ModelConfig(**TINY, attention_sinks=True, attention_bias=True, attention_out_bias=True,
                              rope_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=32,
                              sliding_window=4, layer_types=(SLIDING_ATTENTION, FULL_ATTENTION)),
}


def _random_model(config: ModelConfig, seed: int = 0) -> Decoder:
    model = Decoder(config, rngs=nnx.Rngs(seed))
    # non-trivial norm weights and biases, so a mistake in any of them shows in the logits
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and variable[...].ndim == 1:
            variable.set_value(jnp.asarray(rng.normal(0.0, 0.3, variable[...].shape), jnp.float32))
    return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_forward_matches_full_forward(name):
    """Prefill a chunk, then feed tokens one at a time: every position's logits equal the uncached decoder's."""
    config = VARIANTS[name]
    model = _random_model(config)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, 12), jnp.int32)
    reference = model(tokens[None])[0]  # [12, V]
    decode = nnx.jit(lambda model, t, p, c: model.decode(t, p, c))
    cache = model.init_cache(1, 16)
    hidden, cache = decode(model, tokens[None, :5], jnp.arange(5, dtype=jnp.int32)[None], cache)
    logits = [gen.head_logits(model, h) for h in hidden[0]]
    for position in range(5, 12):
        hidden, cache = decode(model, tokens[None, position:position + 1], jnp.full((1, 1), position, jnp.int32), cache)
        logits.append(gen.head_logits(model, hidden[0, 0]))
    assert_close(np.stack(logits), np.asarray(reference), 1e-5, what="cached logits")


@pytest.mark.parametrize("name", ["gemma2_like", "llama_gqa_tied"])
def test_batched_decode_rows_at_their_own_positions(name):
    """Two rows of different prompt lengths decoded together: each row's logits equal its own uncached forward."""
    config = VARIANTS[name]
    model = _random_model(config, seed=2)
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, config.vocab_size, 11), rng.integers(0, config.vocab_size, 8)]
    references = [np.asarray(model(jnp.asarray(r, jnp.int32)[None])[0]) for r in rows]
    decode = nnx.jit(lambda model, t, p, c: model.decode(t, p, c))
    prompt = np.zeros((2, 6), np.int32)
    prompt[0], prompt[1, :4] = rows[0][:6], rows[1][:4]  # row 1 is right-padded in the prefill
    hidden, cache = decode(model, jnp.asarray(prompt), jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6)),
                           model.init_cache(2, 16))
    got = [[np.asarray(gen.head_logits(model, hidden[0, t])) for t in range(6)],
           [np.asarray(gen.head_logits(model, hidden[1, t])) for t in range(4)]]
    positions = [6, 4]
    for _ in range(4):
        tokens = jnp.asarray([[rows[0][positions[0]]], [rows[1][positions[1]]]], jnp.int32)
        hidden, cache = decode(model, tokens, jnp.asarray([[positions[0]], [positions[1]]], jnp.int32), cache)
        for row in range(2):
            got[row].append(np.asarray(gen.head_logits(model, hidden[row, 0])))
            positions[row] += 1
    for row in range(2):
        assert_close(np.stack(got[row]), references[row][:len(got[row])], 1e-5, what=f"row {row} logits")


@pytest.mark.parametrize("name", ["gemma2_like", "llama_gqa_tied"])
def test_cached_and_uncached_decoding_agree(name):
    model = _random_model(VARIANTS[name], seed=3)
    prompt, new = [5, 17, 42, 8, 3], 10
    with_cache = gen.generate_ids(model, prompt, max_new_tokens=new, use_cache=True)
    without = gen.generate_ids(model, prompt, max_new_tokens=new, use_cache=False)
    assert with_cache == without and len(with_cache) == new
    # greedy with the decoder's own forward in a plain Python loop: an independent (slow) reference
    logits_fn = nnx.jit(lambda m, t: m(t)[0])
    tokens = np.zeros(16, np.int32)
    tokens[:len(prompt)] = prompt
    for position in range(len(prompt), len(prompt) + new):
        tokens[position] = int(jnp.argmax(logits_fn(model, jnp.asarray(tokens[None]))[position - 1]))
    assert with_cache == tokens[len(prompt):len(prompt) + new].tolist()


def test_stops_at_stop_token():
    model = _random_model(VARIANTS["llama_gqa_tied"], seed=3)
    free = gen.generate_ids(model, [5, 17, 42], max_new_tokens=12)
    stop = free[4]
    first = free.index(stop)
    stopped = gen.generate_ids(model, [5, 17, 42], max_new_tokens=12, stop_ids=[stop, 95])
    assert stopped == free[:first + 1]


def test_top_p_tiny_is_greedy_and_seeds_reproduce():
    model = _random_model(VARIANTS["qwen3_like"], seed=4)
    prompt = [1, 2, 3, 4]
    greedy = gen.generate_ids(model, prompt, max_new_tokens=10)
    assert gen.generate_ids(model, prompt, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=7) == greedy
    first = gen.generate_ids(model, prompt, max_new_tokens=10, temperature=1.5, seed=1)
    assert gen.generate_ids(model, prompt, max_new_tokens=10, temperature=1.5, seed=1) == first
    others = {tuple(gen.generate_ids(model, prompt, max_new_tokens=10, temperature=1.5, seed=s)) for s in range(2, 6)}
    assert len(others | {tuple(first)}) > 1


def test_sampling_distribution_follows_temperature_and_top_p():
    logits = jnp.log(jnp.asarray([0.5, 0.25, 0.15, 0.1]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k, t, p: gen.pick_token(logits, k, t, p, False), in_axes=(0, None, None))
    counts = np.bincount(np.asarray(draw(keys, 1.0, 1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(counts, [0.5, 0.25, 0.15, 0.1], atol=0.03)
    nucleus = np.bincount(np.asarray(draw(keys, 1.0, 0.7)), minlength=4) / len(keys)
    assert nucleus[2] == nucleus[3] == 0  # 0.5 + 0.25 already covers 0.7
    np.testing.assert_allclose(nucleus[:2], [2 / 3, 1 / 3], atol=0.03)
    hot = np.bincount(np.asarray(draw(keys, 2.0, 1.0)), minlength=4) / len(keys)
    expected = np.sqrt([0.5, 0.25, 0.15, 0.1])
    np.testing.assert_allclose(hot, expected / expected.sum(), atol=0.03)


def test_bad_arguments_are_one_line_errors():
    from sftjax.errors import SftjaxError

    model = _random_model(VARIANTS["llama_gqa_tied"])
    for kwargs in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=500)):
        with pytest.raises(SftjaxError) as error:
            gen.generate_ids(model, [1, 2], **kwargs)
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Real chat templates


@pytest.fixture(scope="module")
def smollm2_tokenizer(assets_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "smollm2"))


@pytest.fixture(scope="module")
def llama3(assets_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "llama3" / "hf"))


def test_stop_tokens_come_from_the_template(assets_dir, smollm2_tokenizer, llama3):
    from transformers import AutoTokenizer

    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in gen.stop_token_ids(smollm2_tokenizer)
    assert llama3.convert_tokens_to_ids("<|eot_id|>") in gen.stop_token_ids(llama3)
    qwen = AutoTokenizer.from_pretrained(str(assets_dir / "tokenizers" / "qwen2" / "hf"))
    assert qwen.convert_tokens_to_ids("<|im_end|>") in gen.stop_token_ids(qwen)


def test_prompt_rendering_has_one_bos_and_the_generation_prompt(smollm2_tokenizer, llama3):
    ids = gen.render_prompt_ids(llama3, "Hello", system="Be brief.")
    assert ids.count(llama3.bos_token_id) == 1 and ids[0] == llama3.bos_token_id
    assert llama3.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Be brief." in llama3.decode(ids)
    ids = gen.render_prompt_ids(smollm2_tokenizer, [{"role": "user", "content": "Hi"}])
    assert smollm2_tokenizer.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    custom = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    ids = gen.render_prompt_ids(smollm2_tokenizer, "Hi", chat_template=custom)
    assert smollm2_tokenizer.decode(ids) == "[user] Hi\n[assistant]"


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2 model


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    import sftjax

    model, config = sftjax.load_model("smollm2-135m-instruct")
    return model, config


def test_smollm2_answers_paris(smollm2, smollm2_tokenizer):
    model, _ = smollm2
    answer = gen.generate(model, smollm2_tokenizer, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer, answer


def test_smollm2_greedy_matches_transformers_generate(smollm2, smollm2_tokenizer, smollm2_gguf):
    torch = require("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftjax.models.gguf_read import read_gguf_checkpoint

    hf_config, tensors = read_gguf_checkpoint(smollm2_gguf)
    reference = LlamaForCausalLM(LlamaConfig(**hf_config)).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in tensors}, strict=False)
    reference.tie_weights()
    model, _ = smollm2
    prompt = gen.render_prompt_ids(smollm2_tokenizer, "Name three colors of the rainbow.")
    ours = gen.generate_ids(model, prompt, max_new_tokens=24)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_generate_with_a_saved_model(tmp_path, assets_dir, capsys):
    import shutil

    from transformers import AutoTokenizer

    from sftjax.cli import main
    from sftjax.models.loading import save_model

    config = ModelConfig(**{**TINY, "vocab_size": 49152}, tie_word_embeddings=True)
    model = _random_model(config)
    out = save_model(model, config, tmp_path / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets_dir / "tokenizers" / "smollm2" / name, out / name)
    assert main(["generate", str(out), "--prompt", "Hi", "--max-new-tokens", "5", "--system", "S"]) == 0
    printed = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert printed == gen.generate(model, tokenizer, "Hi", max_new_tokens=5, system="S") + "\n"


def test_cli_missing_model_is_one_line_error(tmp_path, capsys):
    from sftjax.cli import main

    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err


RECORDED = pathlib.Path(__file__).with_name("generate_smollm2_recorded.json")


def test_demo_model_generation_equals_the_recorded_outputs(smollm2_gguf):
    """Greedy and seeded sampling on SmolLM2 through the decoder's decode mode equal, token for token, what the
    earlier stand-alone cached decoder produced (recorded in generate_smollm2_recorded.json before it was
    replaced); batched decoding of all prompts together equals decoding them one by one."""
    import sftjax

    recorded = json.loads(RECORDED.read_text())
    model, config = sftjax.load_model(smollm2_gguf)
    tokenizer = sftjax.load_tokenizer(smollm2_gguf)
    stops = gen.stop_token_ids(tokenizer, config)
    max_new = recorded["max_new_tokens"]
    for item in recorded["generate"]:
        assert gen.render_prompt_ids(tokenizer, item["prompt"]) == item["prompt_ids"]
        assert gen.generate_ids(model, item["prompt_ids"], max_new_tokens=max_new, stop_ids=stops) == item["new_ids"]
    batched = gen.generate_batch_ids(model, [item["prompt_ids"] for item in recorded["generate"]],
                                     max_new_tokens=max_new, stop_ids=stops)
    assert batched == [item["new_ids"] for item in recorded["generate"]]
    sampled = recorded["sampled"][0]
    ids = gen.render_prompt_ids(tokenizer, sampled["prompt"])
    assert gen.generate_ids(model, ids, max_new_tokens=max_new, stop_ids=stops, temperature=sampled["temperature"],
                            top_p=sampled["top_p"], seed=sampled["seed"]) == sampled["new_ids"]
    from sftjax.infer.chat import ChatSession

    session = ChatSession(model, tokenizer, system="You are terse.", max_new_tokens=30)
    for turn in recorded["chat"]:
        assert session.send(turn["user"]) == turn["reply"]


def test_prompt_longer_than_the_context_is_one_line(tmp_path):
    model = _random_model(VARIANTS["llama_gqa_tied"])
    limit = model.config.max_position_embeddings
    with pytest.raises(ConfigError, match="exceeds the model's context") as info:
        gen.generate_ids(model, [1] * limit, max_new_tokens=4)
    assert "\n" not in str(info.value)
