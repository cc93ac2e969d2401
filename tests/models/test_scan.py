"""Scan over layers (sftjax.models.scan): the stacked layout computes what the per-layer layout computes.

The oracle is the unscanned model (itself checked against transformers in test_models_families): same weights,
same batch, logits and gradients compared per layer. Also: the plan for alternating / irregular layer patterns,
the round trip back to one module per layer, LoRA and modules_to_save on stacked layers, and the Trainer with
``model.scan_layers=true`` against the same run unscanned (losses, final weights, export, resume).
"""

from __future__ import annotations

import os
import pathlib
import signal

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from sftjax.config import LoraSection
from sftjax.errors import ConfigError
from sftjax.models.config import ModelConfig
from sftjax.models.decoder import Decoder
from sftjax.models.scan import ScanBlock, plan_scan, stack_layers, unstacked, unstacked_paths
from sftjax.peft.lora import apply_lora, split_model
from tests.oracle import assert_close

REPO = pathlib.Path(__file__).resolve().parents[2]
VOCAB = 97


def config(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
                head_dim=8, max_position_embeddings=64)
    base.update(changes)
    return ModelConfig(**base)


GEMMA2_LIKE = dict(architecture="Gemma2ForCausalLM", sandwich_norms=True, norm_plus_one=True, activation="gelu_tanh",
                   sliding_window=4, layer_types=("sliding_attention", "full_attention") * 2,
                   attn_logit_softcap=50.0, final_logit_softcap=30.0, embedding_scale=32 ** 0.5,
                   tie_word_embeddings=True)
# full layers with their own head shape, keys as values and their own RoPE: two layer kinds in one period
GEMMA4_LIKE = dict(architecture="Gemma4ForCausalLM", family="gemma4_text", sandwich_norms=True, qk_norm=True,
                   v_norm=True, layer_scalar=True, activation="gelu_tanh", sliding_window=4,
                   layer_types=("sliding_attention", "full_attention") * 2, sliding_rope_theta=100.0,
                   rope_type="proportional", partial_rotary_factor=0.5, global_head_dim=16, global_num_kv_heads=1,
                   attention_k_eq_v=True, query_pre_attn_scalar=1.0, final_logit_softcap=30.0,
                   embedding_scale=32 ** 0.5, tie_word_embeddings=True)
QWEN2_WINDOW_TAIL = dict(architecture="Qwen2ForCausalLM", attention_bias=True, sliding_window=4,
                         layer_types=("full_attention",) * 3 + ("sliding_attention",), num_layers=4)


def random_model(cfg: ModelConfig, *, lora: LoraSection = LoraSection(), seed: int = 0) -> Decoder:
    """O(1) random weights (and non-zero LoRA B) so every gradient is well above rounding."""
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    apply_lora(model, lora, rngs=nnx.Rngs(seed + 1))
    rng = np.random.default_rng(seed)
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            shape = variable.get_value().shape
            value = rng.normal(0.0, 0.15, shape) if len(shape) > 1 else rng.uniform(0.8, 1.2, shape)
            variable.set_value(jnp.asarray(value, jnp.float32))
    return model


def packed_batch(rows: int = 2, length: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (rows, length)).astype(np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for row in range(rows):
        cut = int(rng.integers(5, length - 6))
        segment_ids[row, :cut], segment_ids[row, cut:length - 3] = 1, 2  # two examples, then padding
        positions[row, :cut] = np.arange(cut)
        positions[row, cut:length - 3] = np.arange(length - 3 - cut)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)


def loss_fn(model, batch):
    tokens, positions, segment_ids = batch
    logits = model(tokens, positions_BL=positions, segment_ids_BL=segment_ids)
    weights = (segment_ids > 0).astype(jnp.float32)
    return (jax.nn.logsumexp(logits, -1) * weights).sum() / weights.sum()


def per_layer_grads(model, batch) -> dict[str, np.ndarray]:
    """Gradient of every variable by its per-layer path (stacked gradients split back into layers)."""
    grads = nnx.grad(loss_fn)(model, batch)
    plan = getattr(model, "scan_plan", None)
    out = {}
    for path, value in nnx.to_flat_state(grads):
        value = np.asarray(value.get_value() if hasattr(value, "get_value") else value)
        if plan is None or str(path[0]) != "layers":
            out["/".join(map(str, path))] = value
        else:
            for index, layer_path in enumerate(unstacked_paths(plan, path)):
                out["/".join(map(str, layer_path))] = value[index]
    return out


@pytest.mark.parametrize("changes,plan", [
    ({}, (ScanBlock(0, 1, 4),)),
    (GEMMA2_LIKE, (ScanBlock(0, 2, 2),)),
    (QWEN2_WINDOW_TAIL, (ScanBlock(0, 1, 3), ScanBlock(3, 1, 1))),
    (GEMMA4_LIKE, (ScanBlock(0, 2, 2),)),
], ids=["llama", "gemma2_alternating", "qwen2_window_tail", "gemma4_alternating"])
@pytest.mark.parametrize("remat", ["none", "full", "offload_dots"])
def test_scanned_logits_and_gradients_equal_unscanned(changes, plan, remat):
    cfg = config(**changes, remat=remat)
    batch = packed_batch()
    plain = random_model(cfg)
    scanned = stack_layers(random_model(cfg))
    assert scanned.scan_plan == plan
    np.testing.assert_allclose(np.asarray(nnx.jit(loss_fn)(scanned, batch)), np.asarray(loss_fn(plain, batch)),
                               rtol=1e-6)
    tokens, positions, segment_ids = batch
    want_logits = np.asarray(plain(tokens, positions_BL=positions, segment_ids_BL=segment_ids))
    # eager vs jitted unscanned already differ by ~4e-6 of the logits' scale (fp32 reordering, softcaps)
    assert_close(np.asarray(scanned(tokens, positions_BL=positions, segment_ids_BL=segment_ids)), want_logits, 1e-5,
                 what="logits")
    want, got = per_layer_grads(plain, batch), per_layer_grads(scanned, batch)
    assert sorted(want) == sorted(got) and any("layers/3/" in k for k in want)
    for name in want:
        scale = np.abs(want[name]).max()
        assert scale > 1e-4, name
        # fp32 reordering (jit vs eager, remat): measured up to 1.1e-5 of a gradient's scale
        assert_close(got[name], want[name], 5e-5, what=name)


def test_stacked_variables_carry_layers_axis_and_round_trip_exactly():
    lora = LoraSection(enabled=True, r=2, dropout=0.1, target_modules="all-linear")
    original = random_model(config(**GEMMA2_LIKE), lora=lora)
    expected = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(original))
                if isinstance(v, nnx.Param)}
    scanned = stack_layers(random_model(config(**GEMMA2_LIKE), lora=lora))
    kernel = scanned.layers[0][1].attn.q_proj.kernel
    assert kernel.get_value().shape == (2, 32, 32)
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
    assert isinstance(scanned.layers[0][0].attn.q_proj.lora_a, nnx.LoRAParam)
    assert scanned.layers[0][1].attn.sliding_window is None and scanned.layers[0][0].attn.sliding_window == 4
    back = unstacked(scanned)
    assert back.scan_plan is None and len(back.layers) == 4 and scanned.scan_plan is not None  # input untouched
    got = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(back))
           if isinstance(v, nnx.Param)}
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert back.layers[2].attn.q_proj.kernel.get_metadata()["logical_axes"] == ("embed", "heads")


def test_lora_on_some_layers_scans_in_runs_and_matches():
    lora = LoraSection(enabled=True, r=2, target_modules=[r"layers\.[01]\.attn\.q_proj"])
    plain = random_model(config(), lora=lora)
    scanned = stack_layers(random_model(config(), lora=lora))
    assert scanned.scan_plan == (ScanBlock(0, 1, 2), ScanBlock(2, 1, 2))
    batch = packed_batch()
    _, trainable_plain, _ = split_model(plain, lora)
    _, trainable_scanned, _ = split_model(scanned, lora)
    assert sum(x.size for x in jax.tree.leaves(trainable_plain)) == sum(x.size for x in jax.tree.leaves(trainable_scanned))
    want, got = per_layer_grads(plain, batch), per_layer_grads(scanned, batch)
    for name in ("layers/0/attn/q_proj/lora_b", "layers/1/attn/q_proj/lora_a", "layers/3/mlp/up_proj/kernel"):
        assert_close(got[name], want[name], 2e-5, what=name)


def test_modules_to_save_selects_whole_stacks_or_refuses():
    everywhere = LoraSection(enabled=True, r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "mlp_norm"])
    scanned = stack_layers(random_model(config(), lora=everywhere))
    _, trainable, _ = split_model(scanned, everywhere)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert "embed_tokens/embedding" in names and "layers/0/0/mlp_norm/weight" in names
    assert "layers/0/0/attn_norm/weight" not in names

    partial = LoraSection(enabled=True, r=2, target_modules=["q_proj"], modules_to_save=[r"layers/2/mlp_norm"])
    scanned = stack_layers(random_model(config(), lora=partial))
    with pytest.raises(ConfigError, match=r"layers/2/mlp_norm/weight but not layers/0/mlp_norm/weight"):
        split_model(scanned, partial)
    with pytest.raises(ConfigError, match="before"):
        apply_lora(scanned, partial, rngs=nnx.Rngs(0))


def test_plan_is_periodic_when_a_short_period_fits():
    nine_alternating = config(num_layers=6, sliding_window=4,
                              layer_types=("sliding_attention", "sliding_attention", "full_attention") * 2)
    assert plan_scan(Decoder(nine_alternating, rngs=nnx.Rngs(0)).layers) == (ScanBlock(0, 3, 2),)
    irregular = config(num_layers=5, sliding_window=4, layer_types=("full_attention", "sliding_attention",
                                                                      "sliding_attention", "full_attention",
                                                                      "full_attention"))
    assert plan_scan(Decoder(irregular, rngs=nnx.Rngs(0)).layers) == (
        ScanBlock(0, 1, 1), ScanBlock(1, 1, 2), ScanBlock(3, 1, 2))


# ------------------------------------------------------------------------------------------------ the trainer

def tiny_overrides(assets_dir, out_dir, *extra):
    return [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
            f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
            f"train.output_dir={out_dir}", "train.progress=false", "train.tensorboard=false", *extra]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trainer_scanned_run_equals_unscanned(assets_dir, tmp_path, mode):
    import sftjax

    extra = ["train.steps=3", "train.eval_every=0", "train.log_every=1", "model.remat=full"]
    if mode == "lora":
        extra += ["lora.enabled=true", "lora.r=4", "lora.modules_to_save=[mlp_norm]", "train.save=adapter"]
    results = {}
    for scan in (False, True):
        out = tmp_path / f"scan_{scan}"
        cfg = sftjax.load_config(REPO / "configs" / "tiny_cpu.yaml",
                                 overrides=tiny_overrides(assets_dir, out, *extra, f"model.scan_layers={scan}"))
        trainer = sftjax.Trainer(cfg)
        assert (trainer.model.scan_plan is not None) == scan
        trainer.open_checkpoints()
        try:
            trainer.fit()
        finally:
            trainer.close_checkpoints()
        assert trainer.train_step._cache_size() == 1
        lines = (out / "metrics.jsonl").read_text().splitlines()
        results[scan] = ([float(__import__("json").loads(line)["loss"]) for line in lines if '"loss"' in line],
                         trainer.updated_model(), trainer.evaluate())
    (losses_plain, model_plain, eval_plain), (losses_scan, model_scan, eval_scan) = results[False], results[True]
    np.testing.assert_allclose(losses_scan, losses_plain, rtol=2e-5)
    np.testing.assert_allclose(eval_scan["loss"], eval_plain["loss"], rtol=2e-5)
    want = dict(nnx.to_flat_state(nnx.state(model_plain, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(model_scan, nnx.Param)))
    assert sorted(want) == sorted(got)
    for path in want:
        # a few AdamW steps amplify fp32 reordering (measured up to 6e-6 of a parameter's scale)
        assert_close(np.asarray(got[path].get_value()), np.asarray(want[path].get_value()), 5e-5, what=str(path))
    if mode == "full":  # the exported HF model and the checkpoint both give one module per layer back
        from sftjax.export import model_from_checkpoint

        loaded, _ = sftjax.load_model(tmp_path / "scan_True" / "final")
        restored, _, _, _ = model_from_checkpoint(tmp_path / "scan_True")
        assert restored.scan_plan is None
        for other in (loaded, restored):
            np.testing.assert_array_equal(np.asarray(other.layers[1].mlp.up_proj.kernel[...]),
                                          np.asarray(model_scan.layers[1].mlp.up_proj.kernel[...]))
    else:
        assert (tmp_path / "scan_True" / "final" / "adapter_model.safetensors").exists()


def test_scanned_run_resumes_after_preemption(assets_dir, tmp_path):
    import sftjax

    extra = ["train.log_every=1", "train.eval_every=0", "model.scan_layers=true", "lora.enabled=true", "lora.r=4",
             "lora.dropout=0.1", "checkpoint.save_every_steps=2", "train.save=none"]
    cfg = sftjax.load_config(REPO / "configs" / "tiny_cpu.yaml",
                             overrides=tiny_overrides(assets_dir, tmp_path / "a", *extra, "train.steps=4"))
    trainer = sftjax.Trainer(cfg)
    trainer.open_checkpoints()
    try:
        trainer.fit()
    finally:
        trainer.close_checkpoints()
    final = jax.tree.map(np.asarray, trainer.state.params)

    # a second run is preempted (SIGTERM) after step 2 and resumed: same adapters (dropout keys included)
    first = sftjax.load_config(REPO / "configs" / "tiny_cpu.yaml",
                               overrides=tiny_overrides(assets_dir, tmp_path / "b", *extra, "train.steps=4"))
    part = sftjax.Trainer(first)
    part.add_hook(lambda t, step: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None)
    part.open_checkpoints()
    try:
        assert part.fit()["stopped_at"] == 2
    finally:
        part.close_checkpoints()
    second = sftjax.load_config(REPO / "configs" / "tiny_cpu.yaml",
                                overrides=tiny_overrides(assets_dir, tmp_path / "b", *extra, "train.steps=4"))
    resumed = sftjax.Trainer(second)
    assert resumed.open_checkpoints().step == 2
    try:
        resumed.fit()
    finally:
        resumed.close_checkpoints()
    for want, got in zip(jax.tree.leaves(final), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(got), want)

    unscanned_extra = [e.replace("scan_layers=true", "scan_layers=false") for e in extra]
    unscanned = sftjax.load_config(REPO / "configs" / "tiny_cpu.yaml",
                                   overrides=tiny_overrides(assets_dir, tmp_path / "b", *unscanned_extra,
                                                            "train.steps=4"))
    with pytest.raises(sftjax.errors.CheckpointError, match="model.scan_layers: True -> False"):
        sftjax.Trainer(unscanned).open_checkpoints()



def test_stacking_on_a_mesh_creates_each_stack_in_its_sharding():
    from jax.sharding import PartitionSpec

    from sftjax.sharding import make_mesh, shard_model

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    model = shard_model(random_model(config()), mesh)
    stack_layers(model)
    up = model.layers[0][0].mlp.up_proj.kernel.get_value()
    assert up.shape == (4, 32, 48) and up.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    norm = model.layers[0][0].mlp_norm.weight.get_value()
    assert norm.sharding.spec == PartitionSpec(None, None)
