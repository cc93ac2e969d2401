"""Quantized frozen bases against bitsandbytes (CPU): NF4 (with and without double quantization) and LLM.int8
stored bytes and dequantized float32 bits; a quantized Decoder against the same Decoder holding bitsandbytes'
round trip in dense kernels (logits, LoRA gradients); frozen-ness, sharding and the one-line errors."""

from __future__ import annotations

import dataclasses

import bitsandbytes.functional as bnbF
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from flax import nnx

from sftjax.config import LoraSection
from sftjax.errors import ConfigError
from sftjax.models.decoder import Decoder
from sftjax.models.layers import Linear
from sftjax.models.quant import DYNAMIC_CODE, NF4_LEVELS, QuantizedKernel, QuantizedWeight, quantize_int8, quantize_nf4
from sftjax.peft.quant import check_trainable, quantize_model, quantized_paths
from sftjax.peft.lora import apply_lora, linear_modules, split_model
from tests.conftest import require
from tests.oracle import assert_close
from tests.train.test_step import make_examples, pack_rows, tiny_model_config


def _bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def _weights(shape, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).normal(size=shape) * 0.05).astype(dtype)


def _ours_dequantized(arrays, shape_OI, fmt="nf4"):
    weight = QuantizedWeight(arrays, fmt=fmt, in_features=shape_OI[1], out_features=shape_OI[0],
                             logical_axes=(None, None), source_dtype=jnp.float32)
    return np.asarray(jax.jit(lambda w: w.dequantize())(weight))


def test_code_tables_are_bitsandbytes():
    assert np.array_equal(_bits(NF4_LEVELS), _bits(bnbF.get_4bit_type("nf4", device="cpu").numpy()))
    assert np.array_equal(_bits(DYNAMIC_CODE), _bits(bnbF.create_dynamic_map(signed=True).numpy()))


# (16, 128): blocks within rows (tiled layout); (10, 70) and (3, 300): blocks straddle rows and the last block is
# short; (7, 9): an odd element count and a single short block; (300, 256): 1200 absmax values, several double-
# quantization blocks of 256 and a short last one
NF4_SHAPES = [(16, 128), (10, 70), (3, 300), (7, 9), (300, 256)]


@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_nf4_round_trip_is_bitsandbytes_bit_for_bit(shape):
    w = _weights(shape, seed=sum(shape))
    packed, state = bnbF.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w)
    assert ours["codes"].dtype == np.uint8 and np.array_equal(ours["codes"], packed.numpy().reshape(-1))
    assert np.array_equal(_bits(ours["absmax"]), _bits(state.absmax.numpy()))
    expected = bnbF.dequantize_4bit(packed, state).numpy()
    assert np.array_equal(_bits(_ours_dequantized(ours, shape)), _bits(expected))


@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_nf4_double_quant_is_bitsandbytes_bit_for_bit(shape):
    w = _weights(shape, seed=sum(shape) + 1)
    packed, state = bnbF.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, double_quant=True)
    assert np.array_equal(ours["codes"], packed.numpy().reshape(-1))
    # bitsandbytes' offset is torch's float32 mean, whose last bit depends on torch's summation order; ours is the
    # correctly rounded sum over the count: equal or an ulp or two apart
    offset, theirs = np.float32(ours["absmax_offset"]), np.float32(state.offset.item())
    assert abs(float(offset) - float(theirs)) <= 2 * float(np.spacing(theirs))
    # bitsandbytes' own double quantization of its absmax, with our offset: every byte and bit must agree
    _, plain = bnbF.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    absmax_codes, state2 = bnbF.quantize_blockwise(plain.absmax - torch.tensor(offset), blocksize=256)
    assert np.array_equal(ours["absmax"], absmax_codes.numpy())
    assert np.array_equal(_bits(ours["absmax_scale"]), _bits(state2.absmax.numpy()))
    reference_state = bnbF.QuantState(absmax=absmax_codes, shape=state.shape, dtype=torch.float32, blocksize=64,
                                      code=state.code, quant_type="nf4", offset=torch.tensor(offset), state2=state2)
    expected = bnbF.dequantize_4bit(packed, reference_state).numpy()
    assert np.array_equal(_bits(_ours_dequantized(ours, shape)), _bits(expected))
    if offset == theirs:  # then bitsandbytes' unmodified round trip too
        assert np.array_equal(_bits(_ours_dequantized(ours, shape)), _bits(bnbF.dequantize_4bit(packed, state)))


def test_nf4_where_bitsandbytes_avx512_dequantize_disagrees_with_its_format():
    """[24, 80]: rows not a multiple of 64 but of 16. bitsandbytes' AVX-512 CPU dequantizer indexes absmax per row
    (``row * (80 // 64) + col // 64``), which is not the flat blocks its quantizer wrote; its portable dequantizer
    (the format's definition, also what CUDA does) reads flat blocks. We follow the format."""
    w = _weights((24, 80), seed=3)
    packed, state = bnbF.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w)
    assert np.array_equal(ours["codes"], packed.numpy().reshape(-1))
    definition = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, state.code, 64, state.shape,
                                          torch.float32).numpy()
    assert np.array_equal(_bits(_ours_dequantized(ours, (24, 80))), _bits(definition))
    # and the round trip is close to the weight (level spacing x absmax), unlike the misindexed blocks
    assert np.abs(_ours_dequantized(ours, (24, 80)) - w).max() <= 0.2 * np.abs(w).max()


def test_nf4_codes_of_bfloat16_weights():
    w = torch.from_numpy(_weights((8, 128), seed=5)).to(torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w.float().numpy())
    assert np.array_equal(ours["codes"], packed.numpy().reshape(-1))
    assert np.array_equal(_bits(ours["absmax"]), _bits(state.absmax.float().numpy()))


@pytest.mark.parametrize("shape", [(16, 64), (10, 70), (7, 9)])
def test_int8_is_bitsandbytes_linear8bitlt(shape):
    import bitsandbytes as bnb

    w = _weights(shape, seed=7)
    w[0, 0] = 1e-4  # small entries round to 0 / +-1
    ours = quantize_int8(w)
    weight = bnb.nn.Int8Params(torch.from_numpy(w), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert np.array_equal(ours["codes"], weight.CB.numpy()) and ours["codes"].dtype == np.int8
    assert np.array_equal(_bits(ours["scale"]), _bits(weight.SCB.numpy()))
    expected = bnbF.int8_vectorwise_dequant(weight.CB, weight.SCB).numpy()
    assert np.array_equal(_bits(_ours_dequantized(ours, shape, fmt="int8")), _bits(expected))


def test_int8_zero_row_stores_zeros():
    w = _weights((4, 16))
    w[2] = 0
    ours = quantize_int8(w)
    assert ours["scale"][2] == 0 and not ours["codes"][2].any()
    assert not _ours_dequantized(ours, (4, 16), fmt="int8")[2].any()


# ------------------------------------------------------------------------------------------------ model level


def _bnb_round_trip_IO(kernel_IO, fmt, double_quant):
    """bitsandbytes' dequantize(quantize(W)) of one of our [in, out] kernels, back in our layout."""
    w_OI = torch.from_numpy(np.ascontiguousarray(np.asarray(kernel_IO, np.float32).T))
    if fmt == "int8":
        cb, scb, _ = bnbF.int8_vectorwise_quant(w_OI.half())
        return bnbF.int8_vectorwise_dequant(cb, scb).numpy().T
    packed, state = bnbF.quantize_4bit(w_OI, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    if double_quant:  # our offset (see test_nf4_double_quant_is_bitsandbytes_bit_for_bit)
        offset = quantize_nf4(w_OI.numpy(), double_quant=True)["absmax_offset"]
        _, plain = bnbF.quantize_4bit(w_OI, blocksize=64, quant_type="nf4")
        codes, state2 = bnbF.quantize_blockwise(plain.absmax - torch.tensor(offset), blocksize=256)
        state = bnbF.QuantState(absmax=codes, shape=state.shape, dtype=torch.float32, blocksize=64, code=state.code,
                                quant_type="nf4", offset=torch.tensor(offset), state2=state2)
    if w_OI.shape[1] % 64 and w_OI.shape[1] % 16 == 0:  # see the AVX-512 test above
        return _dequantize_4bit_compute(packed.reshape(-1), state.absmax if not double_quant else
                                        bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset,
                                        state.code, 64, state.shape, torch.float32).numpy().T
    return bnbF.dequantize_4bit(packed, state).numpy().T


def _config():
    # hidden 64 keeps q/k/v/gate/up tiled (in % 64 == 0); o_proj (in 32) and down_proj (in 96) are flat
    return tiny_model_config(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=8)


def _lora(**changes):
    base = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}
    base.update(changes)
    return LoraSection(**base)


def _with_adapters(model, lora, seed=1):
    names = apply_lora(model, lora, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for name in names:
        module = linear_modules(model)[name]
        module.lora_b[...] = jnp.asarray(rng.normal(0, 0.1, module.lora_b[...].shape).astype(np.float32))
    return names


def _loss_and_grads(model, lora, batch):
    graphdef, trainable, frozen = split_model(model, lora)

    def loss(trainable):
        m = nnx.merge(graphdef, trainable, frozen)
        logits = m(jnp.asarray(batch["tokens"]), positions_BL=jnp.asarray(batch["positions"]),
                   segment_ids_BL=jnp.asarray(batch["segment_ids"]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
        mask = jnp.asarray(batch["loss_mask"], jnp.float32)
        return jnp.sum(ce * mask) / jnp.sum(mask), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return value, logits, grads, trainable, frozen


@pytest.mark.parametrize("fmt,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_quantized_decoder_equals_dense_decoder_holding_the_bnb_round_trip(fmt, double_quant):
    config = _config()
    quantized = Decoder(config, rngs=nnx.Rngs(0))
    dense = Decoder(config, rngs=nnx.Rngs(0))
    names = [n for n in linear_modules(dense) if n != "lm_head"]
    for name in names:
        module = linear_modules(dense)[name]
        module.kernel[...] = jnp.asarray(_bnb_round_trip_IO(module.kernel[...], fmt, double_quant))
    report = quantize_model(quantized, fmt, double_quant=double_quant)
    assert sorted(report) == sorted(names) and len(names) == 2 * 7
    assert isinstance(quantized.lm_head.kernel, nnx.Param) and isinstance(quantized.embed_tokens.embedding, nnx.Param)
    q_proj = quantized.layers[0].attn.q_proj.kernel
    assert isinstance(q_proj, QuantizedWeight) and q_proj.codes[...].dtype == (jnp.int8 if fmt == "int8" else
                                                                              jnp.uint8)
    for name in names:  # the dequantized kernels are the round trip, bit for bit
        np.testing.assert_array_equal(_bits(linear_modules(quantized)[name].base_kernel()),
                                      _bits(linear_modules(dense)[name].kernel[...]))
    lora = _lora()
    _with_adapters(quantized, lora)
    _with_adapters(dense, lora)
    batch = pack_rows(make_examples(0, 8), rows=4, per_row=2)
    loss_q, logits_q, grads_q, trainable, frozen = _loss_and_grads(quantized, lora, batch)
    loss_d, logits_d, grads_d, _, _ = _loss_and_grads(dense, lora, batch)
    assert_close(logits_q, logits_d, 1e-5, what="logits")
    assert_close(loss_q, loss_d, 1e-5, what="loss")
    for (path, g_q), (_, g_d) in zip(nnx.to_flat_state(grads_q), nnx.to_flat_state(grads_d)):
        assert_close(g_q[...], g_d[...], 1e-5, what="/".join(map(str, path)))
    # only adapters train; the quantized arrays are frozen and are not params
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(trainable))
    frozen_types = {type(v) for _, v in nnx.to_flat_state(frozen)}
    assert QuantizedKernel in frozen_types and not issubclass(QuantizedKernel, nnx.Param)
    dense_kernels = [p for p, _ in nnx.to_flat_state(nnx.state(quantized, nnx.Param)) if "kernel" in map(str, p)]
    assert [tuple(map(str, p)) for p in dense_kernels] == [("lm_head", "kernel")]


def test_quantized_base_stays_bit_identical_through_steps():
    from tests.train.test_step import adamw, build_step

    config = _config()
    model = Decoder(config, rngs=nnx.Rngs(0))
    quantize_model(model, "nf4", double_quant=True)
    lora = _lora()
    _with_adapters(model, lora)
    step, state, frozen, graphdef = build_step(model, adamw(lr=1e-2), lora=lora)
    before = jax.tree.map(np.asarray, nnx.state(model, QuantizedKernel))
    losses = []
    for seed in range(3):
        state, metrics = step(state, frozen, pack_rows(make_examples(seed, 8), rows=4, per_row=2),
                              jax.random.key(seed))
        losses.append(float(metrics["loss"]))
    after = nnx.state(nnx.merge(graphdef, state.params, frozen), QuantizedKernel)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert np.all(np.isfinite(losses)) and losses[-1] != losses[0]


def test_quantized_kernel_shards_like_the_dense_kernel():
    from jax.sharding import PartitionSpec as P

    from sftjax.sharding import make_mesh, shard_model

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    layer = Linear(128, 64, logical_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 128)).astype(np.float32))
    layer.quantize("nf4", double_quant=True)
    expected = np.asarray(layer(x))
    shard_model(layer, mesh)
    specs = {name: getattr(layer.kernel, name)[...].sharding.spec for name in layer.kernel.names}
    # codes [out, in/2] and absmax codes [out, in/64]: out over tensor ("mlp"), in over fsdp ("embed")
    assert specs["codes"] == P("tensor", "fsdp") and specs["absmax"] == P("tensor", "fsdp")
    assert specs["absmax_scale"] == P(None) and specs["absmax_offset"] == P()
    assert_close(jax.jit(lambda m, x: m(x))(layer, x), expected, 1e-6, what="sharded quantized linear")


def test_quantize_errors_and_refusals():
    config = _config()
    model = Decoder(config, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model.quantize='nf8' is not one of nf4, int8, none"):
        quantize_model(model, "nf8")

    class Experts(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((2, 4, 4)))

    model.layers[1].mlp.experts = Experts()
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.experts is a Experts, which quantization does not support"):
        quantize_model(model, "nf4")
    from sftjax.models.moe import ExpertLinear

    model = Decoder(config, rngs=nnx.Rngs(0))  # stacked MoE experts are quantized (tests/peft/test_quant_moe.py)...
    model.layers[0].mlp.up_proj = ExpertLinear(4, 64, 96, use_bias=False, logical_axes=("expert", "embed", "mlp"),
                                               param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    model.layers[1].mlp.experts = Experts()  # ...but not a module of unknown layout, wherever it sits
    with pytest.raises(ConfigError) as info:
        quantize_model(model, "int8")
    assert str(info.value) == ("model.quantize=int8: layers.1.mlp.experts is a Experts, which quantization "
                               "does not support (only Linear layers of attention and MLP, and stacked MoE experts)")
    assert not quantized_paths(model)  # refused before any layer changed
    model = Decoder(config, rngs=nnx.Rngs(0))
    quantize_model(model, "int8")
    assert quantized_paths(model) and all("lm_head" not in p for p in quantized_paths(model))
    with pytest.raises(ConfigError, match="training a quantized base is not supported"):
        check_trainable(model, lora_enabled=False)
    with pytest.raises(ConfigError, match="modules_to_save entry 'mlp/up_proj' selects the quantized"):
        check_trainable(model, lora_enabled=True, modules_to_save=["mlp/up_proj"])
    check_trainable(model, lora_enabled=True, modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "nf4")
    dora = Decoder(config, rngs=nnx.Rngs(0))
    dora.layers[0].attn.q_proj.enable_lora(2, 4.0, rngs=nnx.Rngs(1), use_dora=True)
    with pytest.raises(ConfigError, match=r"layers\.0\.attn\.q_proj already has a DoRA adapter"):
        quantize_model(dora, "nf4")


def test_scanned_qlora_step_holds_no_dense_copy_of_the_base():
    """Compiled memory (XLA's memory analysis, CPU) of the LoRA gradient of a scanned 8-layer model: the NF4 base
    takes its codes' bytes as arguments and no more temporary memory than the dense model (autodiff through the
    dequantization would keep every layer's dense weight as a scan residual: 145 MiB instead of 65 here)."""
    from sftjax.models.scan import stack_layers

    config = tiny_model_config(hidden_size=512, intermediate_size=1024, num_layers=8, num_heads=8, num_kv_heads=8,
                               head_dim=64)
    lora = _lora()
    tokens = jnp.ones((2, 64), jnp.int32)
    memory, logits = {}, {}
    for fmt in ("none", "nf4"):
        model = Decoder(config, rngs=nnx.Rngs(0))
        if fmt != "none":
            quantize_model(model, fmt)
        apply_lora(model, lora, rngs=nnx.Rngs(1))
        unscanned = np.asarray(model(tokens[:, :16]))
        stack_layers(model)
        graphdef, trainable, frozen = split_model(model, lora)
        logits[fmt] = (unscanned, np.asarray(nnx.merge(graphdef, trainable, frozen)(tokens[:, :16])))

        def loss(trainable, frozen, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, trainable, frozen)(tokens))

        memory[fmt] = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().memory_analysis()
    assert_close(logits["nf4"][1], logits["nf4"][0], 1e-5, what="scanned vs unscanned NF4 logits")
    dense, nf4 = memory["none"], memory["nf4"]
    assert nf4.argument_size_in_bytes < 0.2 * dense.argument_size_in_bytes
    assert nf4.temp_size_in_bytes <= 1.05 * dense.temp_size_in_bytes, (nf4.temp_size_in_bytes, dense.temp_size_in_bytes)


@pytest.mark.parametrize("fmt,scan", [("nf4", False), ("nf4", True), ("int8", True)])
def test_quantized_param_count_is_the_dense_count_of_the_quantized_kernels(fmt, scan):
    from sftjax.models.scan import stack_layers
    from sftjax.peft.quant import quantized_param_count

    model = Decoder(_config(), rngs=nnx.Rngs(0))
    dense = sum(int(np.prod(m.kernel[...].shape)) for n, m in linear_modules(model).items() if n != "lm_head")
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    quantize_model(model, fmt)
    if scan:
        stack_layers(model)
    assert quantized_param_count(model) == dense
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) + dense == total


def test_attention_sinks_stay_a_float_param_of_a_quantized_model():
    config = dataclasses.replace(_config(), attention_sinks=True)
    model = Decoder(config, rngs=nnx.Rngs(0))
    model.layers[0].attn.sinks[...] = jnp.linspace(-1.0, 1.0, config.num_heads)
    before = np.asarray(model.layers[0].attn.sinks[...])
    report = quantize_model(model, "nf4")
    assert len(report) == 2 * 7 and isinstance(model.layers[0].attn.q_proj.kernel, QuantizedWeight)
    sinks = model.layers[0].attn.sinks
    assert isinstance(sinks, nnx.Param) and sinks[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(sinks[...]), before)


def test_cast_to_compute_dtype_keeps_quantized_arrays():
    from sftjax.train.step import cast_floating

    layer = Linear(64, 8, use_bias=True, rngs=nnx.Rngs(0))
    layer.quantize("nf4", double_quant=True)
    cast = cast_floating(nnx.state(layer), jnp.bfloat16)
    assert cast["bias"][...].dtype == jnp.bfloat16
    dtypes = {name: cast["kernel"][name][...].dtype for name in ("codes", "absmax", "absmax_scale", "absmax_offset")}
    assert dtypes == {"codes": jnp.uint8, "absmax": jnp.uint8, "absmax_scale": jnp.float32,
                      "absmax_offset": jnp.float32}


def test_qlora_run_through_the_trainer_trains_adapters_only(assets_dir, tmp_path):
    """model.quantize via the config: loss goes down, the quantized base (bitsandbytes' codes of the seeded init)
    stays bit-identical, checkpoints hold only the adapters, and the merged final/ is dequantized base + LoRA."""
    import json
    import pathlib

    import sftjax
    from sftjax.train.program import build_model

    repo = pathlib.Path(__file__).resolve().parents[2]
    overrides = [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
                 f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
                 f"train.output_dir={tmp_path}", "train.progress=false", "train.tensorboard=false", "train.steps=10",
                 "train.log_every=1", "train.eval_every=0", "checkpoint.save_every_steps=5", "checkpoint.async_save=false",
                 "lora.enabled=true", "lora.r=4", "lora.alpha=8", "model.quantize=nf4", "model.double_quant=true",
                 "model.scan_layers=true", "model.compute_dtype=bfloat16", "optim.learning_rate=3e-2"]
    cfg = sftjax.load_config(repo / "configs" / "tiny_cpu.yaml", overrides)
    trainer = sftjax.Trainer(cfg)
    trainer.open_checkpoints()
    before = {path: np.asarray(v[...]).copy() for path, v in nnx.to_flat_state(trainer.frozen)
              if isinstance(v, QuantizedKernel)}
    assert len(before) == 4 * 7  # 7 linears per (stacked) layer, 4 arrays each (double quantization)
    trainer.fit()
    after = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(trainer.frozen) if isinstance(v, QuantizedKernel)}
    assert before.keys() == after.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(value, after[path], err_msg="/".join(map(str, path)))
    # the stored base is bitsandbytes' NF4 of the seeded random init (computed here from the dense init)
    dense, _ = build_model(cfg.replace(model=dataclasses.replace(cfg.model, quantize="none", double_quant=False)),
                           tokenizer=trainer.tokenizer)
    trained = trainer.updated_model()
    for layer in (0, 1):
        theirs = quantize_nf4(np.asarray(dense.layers[layer].mlp.up_proj.kernel[...]).T, double_quant=True)
        ours = trained.layers[layer].mlp.up_proj.kernel
        np.testing.assert_array_equal(np.asarray(ours.codes[...]).reshape(-1), theirs["codes"])
        np.testing.assert_array_equal(np.asarray(ours.absmax[...]).reshape(-1), theirs["absmax"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    # checkpoints: only LoRA adapters (and their optimizer state), no frozen or quantized array
    step_dir = tmp_path / "checkpoints" / "10"
    saved = json.loads((step_dir / "params" / "_METADATA").read_text())["tree_metadata"]
    names = list(saved)
    assert names and all("lora_a" in n or "lora_b" in n for n in names), names[:4]
    assert not any(p.name in ("frozen", "model") for p in step_dir.iterdir())
    # merged final/: the dequantized base plus the trained adapters, in transformers
    transformers = require("transformers")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32)
    q_proj = trained.layers[0].attn.q_proj
    base_OI = _bnb_round_trip_IO(dense.layers[0].attn.q_proj.kernel[...], "nf4", True).T
    delta_OI = q_proj.lora_scale * (np.asarray(q_proj.lora_a[...], np.float64)
                                     @ np.asarray(q_proj.lora_b[...], np.float64)).T
    assert np.abs(delta_OI).max() > 1e-3  # the adapter trained
    assert_close(exported.model.layers[0].self_attn.q_proj.weight.detach().numpy(), base_OI + delta_OI, 1e-6,
                 what="merged q_proj")
