"""Every family against transformers (PyTorch CPU float32, use_cache=False): logits, masked loss, gradients,
packed rows vs examples run alone, and the save_model round trip back into transformers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require  # noqa: E402

torch = require("torch")
transformers = require("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy  # noqa: E402
from sftjax.models.loading import load_model, save_model  # noqa: E402
from tests.models.hf_reference import masked_cross_entropy  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

VOCAB = 128
LENGTH = 24  # longer than every sliding window and every "original" rope length below
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama3_rope():
    return {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _gemma4_rope(full_type):
    full = {"rope_type": full_type, "rope_theta": 5000.0}
    if full_type == "proportional":
        full["partial_rotary_factor"] = 0.25
    return {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0}, "full_attention": full}


CASES = {
    "llama3_untied": ("LlamaConfig", dict(COMMON, tie_word_embeddings=False, rope_parameters=_llama3_rope())),
    # dynamic NTK: max_position_embeddings 16 < LENGTH, so frequencies are rescaled for the longer sequence
    "llama_dynamic_bias": ("LlamaConfig", dict(COMMON, max_position_embeddings=16, tie_word_embeddings=False,
                                               attention_bias=True, mlp_bias=True,
                                               rope_parameters={"rope_type": "dynamic", "rope_theta": 1000.0,
                                                                "factor": 2.0})),
    # SmolLM2/TinyLlama style: tied embeddings, multi-query attention; here with linear rope scaling
    "llama_tied_mqa_linear": ("LlamaConfig", dict(COMMON, tie_word_embeddings=True, num_key_value_heads=1,
                                                  rope_parameters={
        "rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    "mistral_window": ("MistralConfig", dict(COMMON, sliding_window=8, tie_word_embeddings=False)),
    "qwen2_bias_window": ("Qwen2Config", dict(COMMON, tie_word_embeddings=True, use_sliding_window=True,
                                              sliding_window=8, max_window_layers=1)),
    "qwen3_qknorm": ("Qwen3Config", dict(COMMON, head_dim=24, tie_word_embeddings=False, attention_bias=True)),
    "gemma": ("GemmaConfig", dict(COMMON, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(COMMON, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # local/global pattern (every 2nd layer full), q/k norm, sliding RoPE base 100, full RoPE 5000 linearly scaled
    "gemma3": ("Gemma3TextConfig", dict(COMMON, num_hidden_layers=4, tie_word_embeddings=True, sliding_window=8,
                                        sliding_window_pattern=2, query_pre_attn_scalar=24, rope_theta=5000.0,
                                        rope_local_base_freq=100.0,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # full layers: head_dim 32 with one kv head, values = keys, proportional RoPE (4 of 16 pairs rotate)
    "gemma4": ("Gemma4TextConfig", dict(COMMON, num_hidden_layers=4, tie_word_embeddings=True, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"] * 2, global_head_dim=32,
                                        num_global_key_value_heads=1, attention_k_eq_v=True,
                                        hidden_size_per_layer_input=0, final_logit_softcapping=5.0,
                                        rope_parameters=_gemma4_rope("proportional"))),
    # full layers with their own v_proj and head_dim, biases everywhere, untied head, default RoPE on full layers
    "gemma4_bias_untied": ("Gemma4TextConfig", dict(COMMON, num_hidden_layers=4, tie_word_embeddings=False,
                                                    sliding_window=8, attention_bias=True,
                                                    layer_types=["sliding_attention"] * 2 + ["full_attention"] * 2,
                                                    global_head_dim=24, hidden_size_per_layer_input=0,
                                                    rope_parameters=_gemma4_rope("default"))),
    # Gemma 4 E2B/E4B style: per-layer inputs (8 wide) into every layer; the last two layers reuse the keys and
    # values of layers 2 (sliding) and 3 (full) and have double-wide MLPs
    "gemma4_ple_kv_shared": ("Gemma4TextConfig", dict(COMMON, num_hidden_layers=6, tie_word_embeddings=True,
                                                      sliding_window=8, layer_types=["sliding_attention",
                                                                                     "full_attention"] * 3,
                                                      global_head_dim=32, num_global_key_value_heads=1,
                                                      hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                                                      num_kv_shared_layers=2, use_double_wide_mlp=True,
                                                      final_logit_softcapping=5.0,
                                                      rope_parameters=_gemma4_rope("proportional"))),
    # Gemma 26B-A4B style: on every layer the dense MLP and 4 routed experts (top 2) side by side
    "gemma4_moe": ("Gemma4TextConfig", dict(COMMON, num_hidden_layers=4, tie_word_embeddings=True, sliding_window=8,
                                            layer_types=["sliding_attention", "full_attention"] * 2,
                                            global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                                            hidden_size_per_layer_input=0, final_logit_softcapping=5.0,
                                            rope_parameters=_gemma4_rope("proportional"), enable_moe_block=True,
                                            num_experts=4, top_k_experts=2, moe_intermediate_size=16)),
    # partial rotary (8 of 16 dims), a window on every layer, longrope with LENGTH beyond the original 16
    "phi3": ("Phi3Config", dict(COMMON, tie_word_embeddings=False, sliding_window=8, partial_rotary_factor=0.5,
                                original_max_position_embeddings=16,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5,
                                                 "short_factor": [1.0, 1.3, 2.0, 3.0],
                                                 "long_factor": [1.0, 2.0, 4.0, 8.0],
                                                 "original_max_position_embeddings": 16})),
}


def _grad_pairs(case: str):
    """(HF parameter, our parameter path, HF rows or None): a few weights whose gradients are compared."""
    if case.startswith("phi3"):
        pairs = [("model.layers.0.self_attn.qkv_proj.weight", "layers.0.attn.q_proj.kernel", (0, 64)),
                 ("model.layers.1.mlp.gate_up_proj.weight", "layers.1.mlp.up_proj.kernel", (96, 192))]
    elif case == "gemma4_moe":  # the dense MLP is the MoE block's shared expert (tests/models/test_gemma4_moe.py
        # compares every gradient, the experts' and the router's included)
        pairs = [("model.layers.0.self_attn.q_proj.weight", "layers.0.attn.q_proj.kernel", None),
                 ("model.layers.1.mlp.down_proj.weight", "layers.1.mlp.shared_expert.down_proj.kernel", None),
                 ("model.layers.2.router.proj.weight", "layers.2.mlp.router.kernel", None)]
    else:
        pairs = [("model.layers.0.self_attn.q_proj.weight", "layers.0.attn.q_proj.kernel", None),
                 ("model.layers.1.mlp.down_proj.weight", "layers.1.mlp.down_proj.kernel", None)]
    pairs += [("model.embed_tokens.weight", "embed_tokens.embedding", None), ("model.norm.weight", "norm.weight", None)]
    if case == "qwen3_qknorm":
        pairs.append(("model.layers.0.self_attn.k_norm.weight", "layers.0.attn.k_norm.weight", None))
    if case.startswith(("gemma2", "gemma3", "gemma4")):
        pairs.append(("model.layers.0.post_feedforward_layernorm.weight", "layers.0.mlp_out_norm.weight", None))
    if case.startswith(("gemma3", "gemma4")):  # a full layer's attention (its own head shape in Gemma 4)
        pairs += [(f"model.layers.3.self_attn.{name}.weight", f"layers.3.attn.{name}.{kind}", None)
                  for name, kind in (("q_norm", "weight"), ("k_norm", "weight"), ("k_proj", "kernel"),
                                     ("o_proj", "kernel"))]
    if case == "gemma4_bias_untied":
        pairs += [("model.layers.3.self_attn.v_proj.bias", "layers.3.attn.v_proj.bias", None),
                  ("lm_head.weight", "lm_head.kernel", None)]
    if case == "gemma4_ple_kv_shared":  # the per-layer inputs; a shared layer's query and its double-wide MLP
        pairs += [("model.embed_tokens_per_layer.weight", "per_layer_embedding.embedding.embedding", None),
                  ("model.per_layer_model_projection.weight", "per_layer_embedding.projection.kernel", None),
                  ("model.per_layer_projection_norm.weight", "per_layer_embedding.norm.weight", None),
                  ("model.layers.1.per_layer_input_gate.weight", "layers.1.per_layer.gate.kernel", None),
                  ("model.layers.4.per_layer_projection.weight", "layers.4.per_layer.projection.kernel", None),
                  ("model.layers.5.post_per_layer_input_norm.weight", "layers.5.per_layer.norm.weight", None),
                  ("model.layers.5.self_attn.q_proj.weight", "layers.5.attn.q_proj.kernel", None),
                  ("model.layers.4.mlp.up_proj.weight", "layers.4.mlp.up_proj.kernel", None),
                  ("model.layers.2.self_attn.v_proj.weight", "layers.2.attn.v_proj.kernel", None)]
    if case == "qwen2_bias_window":
        pairs.append(("model.layers.1.self_attn.k_proj.bias", "layers.1.attn.k_proj.bias", None))
    return pairs


def _make_hf_model(case: str):
    config_class, kwargs = CASES[case]
    config = getattr(transformers, config_class)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # move every weight (norms, biases too) off its default so each one matters
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        for name, buffer in model.named_buffers():  # Gemma 4's stored per-layer output scalars
            if name.endswith("layer_scalar"):
                buffer.fill_(0.5 + torch.rand(()).item())
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def family_case(request, tmp_path_factory):
    case = request.param
    hf_model = _make_hf_model(case)
    directory = tmp_path_factory.mktemp(case)
    hf_model.save_pretrained(directory)
    model, config = load_model(directory, dtype=jnp.float32)
    return case, hf_model, model, config, directory


def _batch(seed=0, batch=2, length=LENGTH):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
    targets = rng.integers(0, VOCAB, size=(batch, length)).astype(np.int32)
    mask = (rng.random((batch, length)) < 0.6).astype(np.int32)
    return tokens, targets, mask


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()


@nnx.jit
def _forward(model, tokens, positions, segment_ids):
    return model(tokens, positions_BL=positions, segment_ids_BL=segment_ids)


def _ours_logits(model, tokens, positions=None, segment_ids=None):
    tokens = jnp.asarray(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return np.asarray(_forward(model, tokens, jnp.asarray(positions), jnp.asarray(segment_ids)))


def test_logits_match_transformers(family_case):
    _, hf_model, model, _, _ = family_case
    tokens, _, _ = _batch()
    ours, ref = _ours_logits(model, tokens), _hf_logits(hf_model, tokens)
    assert ours.shape == ref.shape == (2, LENGTH, VOCAB)
    assert_close(ours, ref, 1e-5, what="logits")


def test_loss_and_gradients_match_transformers(family_case):
    case, hf_model, model, config, _ = family_case
    tokens, targets, mask = _batch(seed=1)
    positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), tokens.shape)
    segments = jnp.ones(tokens.shape, jnp.int32)

    def loss_fn(m):
        hidden = m.hidden_states(jnp.asarray(tokens), positions_BL=positions, segment_ids_BL=segments)
        result = fused_linear_cross_entropy(hidden, m.head_weight(), jnp.asarray(targets), jnp.asarray(mask),
                                            logit_softcap=config.final_logit_softcap)
        return result.loss_sum / result.token_count

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    flat_grads = {".".join(map(str, path)): np.asarray(v.get_value())
                  for path, v in nnx.to_flat_state(grads)}

    hf_model.zero_grad()
    ref_loss = masked_cross_entropy(hf_model(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits,
                                    targets, mask)
    ref_loss.backward()
    ref_loss_value = float(ref_loss.detach())
    assert_close(float(loss), ref_loss_value, 1e-5, what="loss")

    hf_params = dict(hf_model.named_parameters())
    for hf_name, our_path, rows in _grad_pairs(case):
        ref = hf_params[hf_name].grad.numpy()
        if rows is not None:
            ref = ref[rows[0]:rows[1]]
        ours = flat_grads[our_path]
        if our_path.endswith("kernel"):
            ours = ours.T
        assert ours.shape == ref.shape, hf_name
        assert_close(ours, ref, 2e-5, what=f"{hf_name} gradient")


def test_packed_row_matches_examples_run_alone(family_case):
    _, hf_model, model, _, _ = family_case
    rng = np.random.default_rng(2)
    lengths = [9, 11, 6]
    row_length = 32
    examples = [rng.integers(3, VOCAB, size=n).astype(np.int32) for n in lengths]
    tokens = np.zeros((1, row_length), np.int32)
    positions = np.zeros((1, row_length), np.int32)
    segments = np.zeros((1, row_length), np.int32)
    start = 0
    for segment, example in enumerate(examples, start=1):
        tokens[0, start:start + len(example)] = example
        positions[0, start:start + len(example)] = np.arange(len(example))
        segments[0, start:start + len(example)] = segment
        start += len(example)
    packed = _ours_logits(model, tokens, positions, segments)[0]
    start = 0
    for example in examples:
        n = len(example)
        # alone = the only example of its row (same shape as the packed row, so one compilation)
        alone_tokens = np.zeros((1, row_length), np.int32)
        alone_tokens[0, :n] = example
        alone_positions = np.zeros((1, row_length), np.int32)
        alone_positions[0, :n] = np.arange(n)
        alone_segments = (np.arange(row_length) < n).astype(np.int32)[None]
        alone = _ours_logits(model, alone_tokens, alone_positions, alone_segments)[0, :n]
        reference = _hf_logits(hf_model, example[None])[0]
        assert_close(packed[start:start + n], alone, 1e-6, what="packed logits vs alone")
        assert_close(alone, reference, 1e-5, what="logits alone vs transformers")
        start += n


def _packed_row(examples, row_length):
    tokens, positions, segments = (np.zeros((1, row_length), np.int32) for _ in range(3))
    start = 0
    for segment, example in enumerate(examples, start=1):
        tokens[0, start:start + len(example)] = example
        positions[0, start:start + len(example)] = np.arange(len(example))
        segments[0, start:start + len(example)] = segment
        start += len(example)
    return tokens, positions, segments


def test_packed_long_and_short_examples_match_transformers_alone(family_case):
    """A row packing one example longer than the original RoPE length (16 for dynamic NTK and longrope) with two
    shorter ones: each example's logits equal transformers' for that example run alone on a freshly loaded
    model (transformers scales dynamic/longrope frequencies by the longest sequence of a forward, and dynamic NTK
    keeps the longest length it has seen; a fresh model running one example is the reference)."""
    _, _, model, _, directory = family_case
    rng = np.random.default_rng(5)
    examples = [rng.integers(3, VOCAB, size=n).astype(np.int32) for n in (20, 7, 12)]
    packed = _ours_logits(model, *_packed_row(examples, 48))[0]
    start = 0
    for example in examples:
        fresh = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
        reference = _hf_logits(fresh, example[None])[0]
        assert_close(packed[start:start + len(example)], reference, 1e-5,
                     what=f"logits of the {len(example)}-token example in the packed row")
        start += len(example)


def test_round_trip_through_transformers(family_case, tmp_path):
    _, hf_model, model, config, _ = family_case
    out = save_model(model, config, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    assert type(reloaded) is type(hf_model)
    tokens, _, _ = _batch(seed=3)
    assert_close(_hf_logits(reloaded, tokens), _hf_logits(hf_model, tokens), 1e-6, what="reloaded logits")
    assert (out / "generation_config.json").is_file()



def test_gemma4_per_layer_inputs_and_shared_kv_generate_like_transformers(tmp_path):
    """Greedy decoding through the KV cache (shared layers attend over their source layer's cache) gives
    transformers' generate tokens; a scanned layout is refused in one line."""
    from sftjax.errors import ConfigError
    from sftjax.infer.generate import generate_ids
    from sftjax.models.scan import stack_layers

    hf_model = _make_hf_model("gemma4_ple_kv_shared")
    hf_model.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    prompt = [5, 17, 33, 9, 60, 2 + 40]
    ours = generate_ids(model, prompt, max_new_tokens=20)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()
    with pytest.raises(ConfigError, match=r"^model.scan_layers: .*per-layer inputs.*scan_layers: false$"):
        stack_layers(model)


@pytest.mark.parametrize("case", ["gemma4", "gemma4_bias_untied", "gemma4_ple_kv_shared", "gemma4_moe"])
def test_gemma4_layer_scalar_is_frozen_and_lora_finds_the_full_layers_projections(case, tmp_path):
    """The stored per-layer scalar (a buffer in transformers) loads from the checkpoint and never trains, under
    full fine-tuning or LoRA; full layers whose values come from k_proj have no v_proj to adapt."""
    from sftjax.config import LoraSection
    from sftjax.peft.lora import apply_lora, split_model

    hf_model = _make_hf_model(case)
    hf_model.save_pretrained(tmp_path)
    model, config = load_model(tmp_path)
    for layer, hf_layer in zip(model.layers, hf_model.model.layers):
        assert_close(np.asarray(layer.layer_scalar[...]), hf_layer.layer_scalar.detach().numpy(), 0.0,
                     what="layer scalar")
    paths = lambda state: {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}  # noqa: E731
    _, trainable, frozen = split_model(model, LoraSection())
    assert not any("layer_scalar" in p for p in paths(trainable))
    assert {f"layers/{i}/layer_scalar" for i in range(config.num_layers)} <= paths(frozen)
    targets = apply_lora(model, LoraSection(enabled=True, r=2, alpha=4, target_modules="all-linear"),
                         rngs=nnx.Rngs(0))
    full = {i for i in range(config.num_layers) if config.layer_type(i) == "full_attention"}
    assert {t for t in targets if t.endswith("v_proj")} == {
        f"layers.{i}.attn.v_proj" for i in range(config.num_layers)
        if not (config.attention_k_eq_v and i in full) and config.kv_source(i) is None}
    if config.per_layer_input_size:  # the per-layer gates and projections are linear layers too
        assert {f"layers.{i}.per_layer.{name}" for i in range(config.num_layers)
                for name in ("gate", "projection")} <= set(targets)
    _, trainable, _ = split_model(model, LoraSection(enabled=True))
    assert not any("layer_scalar" in p for p in paths(trainable)) and paths(trainable)



def _multimodal_hf_model(case: str):
    """A tiny ...ForConditionalGeneration around the text decoder of ``case`` (a Gemma 3 one with a vision tower)."""
    config_class, kwargs = CASES[case]
    text = getattr(transformers, config_class)(**kwargs)
    if case == "gemma3":
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                                           image_token_index=VOCAB - 3, boi_token_index=VOCAB - 2,
                                           eoi_token_index=VOCAB - 1)
        model_class = transformers.Gemma3ForConditionalGeneration
    else:
        config = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
        model_class = transformers.Gemma4ForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.fill_(0.5 + torch.rand(()).item())
    return model


@pytest.mark.parametrize("case", ["gemma3", "gemma4", "gemma4_moe"])
def test_multimodal_checkpoint_loads_as_its_text_decoder(case, tmp_path):
    """A ...ForConditionalGeneration checkpoint: the text decoder's logits on text equal transformers' (vision tower
    skipped); it saves as the ...ForCausalLM that transformers reloads with the same logits."""
    hf_model = _multimodal_hf_model(case)
    hf_model.save_pretrained(tmp_path / "mm")
    model, config = load_model(tmp_path / "mm")
    assert config.architecture == CASES[case][0].replace("TextConfig", "ForCausalLM")
    tokens, _, _ = _batch(seed=4)
    reference = _hf_logits(hf_model, tokens)
    assert_close(_ours_logits(model, tokens), reference, 1e-5, what="logits")
    out = save_model(model, config, tmp_path / "text")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    assert type(reloaded).__name__ == config.architecture
    assert_close(_hf_logits(reloaded, tokens), reference, 1e-5, what="reloaded logits")


@pytest.mark.parametrize("case", ["gemma3", "gemma4", "gemma4_moe"])
def test_gemma_sharded_load_matches_one_device(case, tmp_path):
    """Loaded straight into a data x fsdp x tensor mesh of 8 devices (Gemma 4's full layers have one kv head, which
    the tensor axis cannot split): the same logits as on one device."""
    from sftjax.sharding import make_mesh

    _make_hf_model(case).save_pretrained(tmp_path)
    single, _ = load_model(tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = load_model(tmp_path, mesh=mesh)
    tokens, _, _ = _batch(seed=6, batch=4)
    forward = nnx.jit(lambda model, t: model(t))
    reference = np.asarray(forward(single, jnp.asarray(tokens)))
    # measured 8e-6 of the logits' scale: the sharded matmuls sum in another order
    assert_close(np.asarray(forward(sharded, jnp.asarray(tokens))), reference, 5e-5, what="sharded logits")
