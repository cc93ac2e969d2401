"""Gradients on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices equal the same computation on one device.

The strict case is one batch row per (data, fsdp) shard with fsdp-sharded weights: there, jax 0.10.2's SPMD
partitioner swaps gradient rows of different shards in the backward matmuls unless the weights are gathered over
fsdp before use (``sftjax.sharding.gather_for_compute``; standalone repro in
``scripts/repro_xla_spmd_row_swap.py``). Every gradient leaf is compared, not just the loss, for each attention
and cross-entropy implementation the CPU dispatcher can pick (``reference``, ``xla_chunked``; the chunked ones
with blocks small enough to loop), under two weight layouts: the logical rules (``shard_model``) and "first
divisible axis over fsdp, last over tensor", the layout that exposed the bug. The one-device run is the oracle:
its gradients are checked against PyTorch in tests/train/test_step.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.attention import xla_chunked as attention_chunked
from pallas_kernels.cross_entropy import xla_chunked as cross_entropy_chunked
from sftjax.config import LoraSection
from sftjax.models.config import ModelConfig
from sftjax.models.decoder import Decoder
from sftjax.sharding import make_mesh, shard_model
from sftjax.peft.lora import apply_lora, split_model
from sftjax.train.step import LossOptions, forward_loss
from tests.oracle import assert_close

VOCAB, LENGTH, ROWS = 128, 32, 4  # 4 rows = one per (data, fsdp) shard


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    return make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Blocks smaller than the batch, so the chunked implementations really loop (and skip masked blocks)."""
    monkeypatch.setattr(attention_chunked, "attention_xla_chunked",
                        functools.partial(attention_chunked.attention_xla_chunked, block_q=8, block_k=16))
    monkeypatch.setattr(cross_entropy_chunked, "fused_linear_cross_entropy_xla_chunked",
                        functools.partial(cross_entropy_chunked.fused_linear_cross_entropy_xla_chunked,
                                          block_t=16, block_v=48))


def tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=False)
    base.update(changes)
    return ModelConfig(**base)


def build_model(config: ModelConfig, *, remat: str = "none", lora: LoraSection = LoraSection()) -> Decoder:
    """A random model with O(1) weights (and non-zero LoRA B), so every gradient is well above rounding."""
    model = Decoder(config, rngs=nnx.Rngs(0), remat=remat)
    apply_lora(model, lora, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            shape = variable.get_value().shape
            value = rng.normal(0.0, 0.2, shape) if len(shape) > 1 else rng.uniform(0.8, 1.2, shape)
            variable.set_value(jnp.asarray(value, jnp.float32))
    return model


def make_batch(seed: int = 0) -> dict:
    """Batch-contract arrays: each row packs two examples of random length, then padding."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((ROWS, LENGTH), np.int32) for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                                              "positions")}
    for row in range(ROWS):
        start = 0
        for segment in (1, 2):
            n = int(rng.integers(5, 15))
            tokens = rng.integers(1, VOCAB, n)
            sl = slice(start, start + n)
            batch["tokens"][row, sl] = tokens
            batch["targets"][row, start:start + n - 1] = tokens[1:]
            batch["loss_mask"][row, start:start + n - 1] = rng.random(n - 1) < 0.7
            batch["segment_ids"][row, sl] = segment
            batch["positions"][row, sl] = np.arange(n)
            start += n
    return batch


def loss_and_grads(graphdef, trainable, frozen, batch, *, attention: str, cross_entropy: str):
    """(summed masked CE, its gradient w.r.t. ``trainable``) through the train step's forward_loss, jitted afresh
    so the implementations apply."""
    options = LossOptions(cross_entropy_implementation=cross_entropy)
    model = nnx.merge(graphdef, trainable, frozen)
    graphdef = nnx.split(model.configure(attention_implementation=attention))[0]  # same state, other kernel

    def value_and_grad(trainable, frozen, batch):
        return jax.value_and_grad(lambda t: forward_loss(graphdef, t, frozen, batch, None, options).loss_sum)(trainable)

    return jax.jit(value_and_grad)(trainable, frozen, batch)


def place_first_axis_fsdp(mesh):
    """Each >= 2-D array: first axis over fsdp and last over tensor where divisible; the rest replicated."""
    def place(x):
        spec = [None] * x.ndim
        if x.ndim >= 2 and x.shape[0] % 2 == 0:
            spec[0] = "fsdp"
        if x.ndim >= 2 and x.shape[-1] % 2 == 0:
            spec[-1] = "tensor"
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))
    return place


def sharded_split(model: Decoder, mesh, layout: str, lora: LoraSection):
    if layout == "logical_rules":
        return split_model(shard_model(model, mesh), lora)
    graphdef, trainable, frozen = split_model(model, lora)
    place = place_first_axis_fsdp(mesh)
    return graphdef, jax.tree.map(place, trainable), jax.tree.map(place, frozen)


def uses_fsdp(sharding) -> bool:
    entries = sharding.spec if isinstance(sharding, NamedSharding) else ()
    return any("fsdp" in (entry if isinstance(entry, tuple) else (entry,)) for entry in entries)


def assert_sharded_matches_one_device(mesh, model_factory, layout, attention, cross_entropy, lora=LoraSection()):
    batch = make_batch()
    graphdef, trainable, frozen = split_model(model_factory(), lora)
    expected_loss, expected = loss_and_grads(graphdef, trainable, frozen, batch, attention=attention,
                                             cross_entropy=cross_entropy)
    assert len(jax.tree.leaves(trainable)) and all(len(x.sharding.device_set) == 1
                                                   for x in jax.tree.leaves(trainable))

    graphdef, trainable, frozen = sharded_split(model_factory(), mesh, layout, lora)
    assert any(uses_fsdp(x.sharding) for x in jax.tree.leaves(trainable)), "no trainable weight is split over fsdp"
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    sharded_batch = {k: jax.device_put(v, rows) for k, v in batch.items()}
    assert sharded_batch["tokens"].addressable_shards[0].data.shape == (1, LENGTH)  # one row per shard
    loss, grads = loss_and_grads(graphdef, trainable, frozen, sharded_batch, attention=attention,
                                 cross_entropy=cross_entropy)

    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    got_leaves = jax.tree.leaves(grads)
    assert len(got_leaves) == len(expected_leaves)
    for (path, want), got in zip(expected_leaves, got_leaves):
        want, got = np.asarray(want), np.asarray(got)
        scale = np.abs(want).max()
        assert scale > 1e-3, f"{jax.tree_util.keystr(path)}: gradient too small to compare"
        # float32 sums in another order: a few ulps of the tensor's scale; the row swap errs by 5-150 %
        assert_close(got, want, 1e-5, what=jax.tree_util.keystr(path))


IMPLEMENTATIONS = [(a, c) for a in ("reference", "xla_chunked") for c in ("reference", "xla_chunked")]


@pytest.mark.parametrize("attention,cross_entropy", IMPLEMENTATIONS)
def test_full_finetune_one_row_per_shard_first_axis_fsdp(mesh, attention, cross_entropy):
    assert_sharded_matches_one_device(mesh, lambda: build_model(tiny_config()), "first_axis_fsdp", attention,
                                      cross_entropy)


@pytest.mark.parametrize("attention,cross_entropy", [("reference", "reference"), ("xla_chunked", "xla_chunked")])
def test_full_finetune_one_row_per_shard_logical_rules(mesh, attention, cross_entropy):
    assert_sharded_matches_one_device(mesh, lambda: build_model(tiny_config()), "logical_rules", attention,
                                      cross_entropy)


@pytest.mark.parametrize("layout", ["first_axis_fsdp", "logical_rules"])
def test_lora_tied_remat_one_row_per_shard(mesh, layout):
    """LoRA adapters on every projection, tied embeddings (the head is the embedding) and full remat."""
    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules="all-linear")
    assert_sharded_matches_one_device(
        mesh, lambda: build_model(tiny_config(tie_word_embeddings=True), remat="full", lora=lora), layout,
        "xla_chunked", "xla_chunked", lora=lora)


def test_scanned_layers_one_row_per_shard(mesh):
    """Stacked layers (model.scan_layers) run in a lax.scan body: the fsdp gather must still apply there."""
    from sftjax.models.scan import stack_layers

    lora = LoraSection(enabled=True, r=4, alpha=8.0, target_modules="all-linear", modules_to_save=["mlp_norm"])
    assert_sharded_matches_one_device(
        mesh, lambda: stack_layers(build_model(tiny_config(num_layers=3), remat="full", lora=lora)),
        "logical_rules", "xla_chunked", "xla_chunked", lora=lora)
