"""Pallas kernels under sharded inputs (pallas_kernels/sharding.py): each device runs the kernel on its own shard.

On 8 fake CPU devices with ``AxisType.Auto`` meshes (8,1,1), (2,2,2) and (1,4,2), the interpret-mode Pallas
implementations, called through the apis on sharded inputs inside ``jax.jit``, must give the forward values and
gradients of the unsharded plain-jnp ``reference`` on one device; the jaxpr must show every ``pallas_call``
inside a ``shard_map`` whose inputs have the per-device shapes, and the compiled HLO must not all-gather the
activations (it did, dozens of times, before the wrapping). A train step of a tiny model with Pallas attention
and loss on a (2,2,2) mesh must equal the single-device step with the reference implementations.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from pallas_kernels import sharding as kernel_sharding
from pallas_kernels.attention.api import attention
from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy

AXES = ("data", "fsdp", "tensor")
MESH_SHAPES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
ROWS, LENGTH, Q_HEADS, KV_HEADS, HEAD_DIM = 8, 32, 4, 2, 16
HIDDEN, VOCAB = 32, 200


def auto_mesh(shape):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:8])


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def segments(rows, length, seed):
    """Two or three packed segments per row of random lengths, then padding."""
    rng = np.random.default_rng(seed)
    out = np.zeros((rows, length), np.int32)
    for row in range(rows):
        position = 0
        for segment in range(1, 4):
            size = int(rng.integers(3, length // 2))
            size = min(size, length - 3 - position)
            if size <= 0:
                break
            out[row, position:position + size] = segment
            position += size
    return jnp.asarray(out)


def attention_inputs(seed, rows=ROWS, kv_heads=KV_HEADS):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (rows, LENGTH, Q_HEADS, HEAD_DIM), jnp.float32)
    k = jax.random.normal(keys[1], (rows, LENGTH, kv_heads, HEAD_DIM), jnp.float32)
    v = jax.random.normal(keys[2], (rows, LENGTH, kv_heads, HEAD_DIM), jnp.float32)
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q, k, v, segments(rows, LENGTH, seed), d_out


def attention_forward_and_grads(implementation):
    def run(q, k, v, segment_ids, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids, sliding_window=20,
                                                     implementation=implementation), q, k, v)
        return out, vjp(d_out)
    return jax.jit(run)


def pallas_calls_and_maps(jaxpr, inside_map=None, found=None):
    """[(pallas_call eqn, the innermost enclosing shard_map eqn or None)] anywhere in ``jaxpr``."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append((eqn, inside_map))
            continue
        enclosing = eqn if eqn.primitive.name == "shard_map" else inside_map
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    pallas_calls_and_maps(sub, enclosing, found)
    return found


def assert_kernels_run_per_device(fn, args, local_shapes):
    """Every pallas_call (forward and backward kernels) sits inside a shard_map, and the forward map's body
    takes the op's inputs with the per-device ``local_shapes`` (in order; constants the body closes over, such
    as splash's mask tables, come as extra inputs)."""
    calls = pallas_calls_and_maps(jax.make_jaxpr(fn)(*args).jaxpr)
    assert len(calls) >= 2, "expected forward and backward pallas_calls"
    inputs_per_map = []
    for call, shard_map in calls:
        assert shard_map is not None, f"pallas_call {call.params.get('name')} runs outside shard_map"
        inputs_per_map.append([var.aval.shape for var in shard_map.params["jaxpr"].invars])

    def in_order(wanted, shapes):
        remaining = iter(shapes)
        return all(any(shape == want for shape in remaining) for want in wanted)

    assert any(in_order(local_shapes, shapes) for shapes in inputs_per_map), (inputs_per_map, local_shapes)


def all_gather_shapes(compiled_text):
    return re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", compiled_text)


@pytest.mark.parametrize("implementation", ["pallas_gpu_interpret", "splash_tpu_interpret"])
@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_sharded_matches_unsharded_reference(mesh_shape, implementation):
    mesh = auto_mesh(mesh_shape)
    q, k, v, segment_ids, d_out = attention_inputs(seed=sum(mesh_shape))
    expected_out, expected_grads = attention_forward_and_grads("reference")(q, k, v, segment_ids, d_out)

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(x, rows) for x in (q, k, v, segment_ids, d_out)]
    step = attention_forward_and_grads(implementation)
    out, grads = step(*args)
    assert relative_error(out, expected_out) <= 1e-5
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert relative_error(got, want) <= 1e-5, name

    data, fsdp, tensor = mesh_shape
    local_rows = ROWS // (data * fsdp)
    local_q = (local_rows, LENGTH, Q_HEADS // tensor, HEAD_DIM)
    local_kv = (local_rows, LENGTH, KV_HEADS // tensor, HEAD_DIM)
    assert_kernels_run_per_device(step, args, [local_q, local_kv, local_kv, (local_rows, LENGTH)])
    assert all_gather_shapes(step.lower(*args).compile().as_text()) == []


def test_attention_axes_that_do_not_divide_are_not_split():
    """6 rows and 1 kv head on (2,2,2): rows split over data only (fsdp would leave 1.5), heads not at all."""
    mesh = auto_mesh((2, 2, 2))
    q, k, v, segment_ids, d_out = attention_inputs(seed=3, rows=6, kv_heads=1)
    expected_out, expected_grads = attention_forward_and_grads("reference")(q, k, v, segment_ids, d_out)
    args = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v, segment_ids, d_out)]
    step = attention_forward_and_grads("pallas_gpu_interpret")
    out, grads = step(*args)
    assert relative_error(out, expected_out) <= 1e-5
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) <= 1e-5
    assert_kernels_run_per_device(step, args, [(3, LENGTH, Q_HEADS, HEAD_DIM), (3, LENGTH, 1, HEAD_DIM),
                                               (3, LENGTH, 1, HEAD_DIM), (3, LENGTH)])


def cross_entropy_inputs(seed, untrained_row=True):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (ROWS, LENGTH, HIDDEN), jnp.float32)
    weight = jax.random.normal(keys[1], (HIDDEN, VOCAB), jnp.float32) * 0.5
    targets = jax.random.randint(keys[2], (ROWS, LENGTH), 0, VOCAB)
    targets = jnp.where(jnp.arange(LENGTH) % 3 == 0, jnp.argmax(hidden @ weight, axis=-1), targets)
    loss_mask = (jax.random.uniform(keys[3], (ROWS, LENGTH)) > 0.3).astype(jnp.int32)
    if untrained_row:  # a row with nothing to train: its token blocks are skipped
        loss_mask = loss_mask.at[1].set(0)
    return hidden, weight, targets, loss_mask


def cross_entropy_sums_and_grads(implementation):
    def run(hidden, weight, targets, loss_mask):
        def loss(hidden, weight):
            result = fused_linear_cross_entropy(hidden, weight, targets, loss_mask, z_loss=1e-3,
                                                implementation=implementation)
            return 0.37 * result.loss_sum, result
        (_, result), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, weight)
        return result, grads
    return jax.jit(run)


@pytest.mark.parametrize("implementation", ["pallas_gpu_interpret", "pallas_tpu_interpret"])
@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cross_entropy_sharded_matches_unsharded_reference(mesh_shape, implementation):
    mesh = auto_mesh(mesh_shape)
    # The TPU interpreter runs every pallas_call in lockstep on all devices (a global barrier), so a device
    # that skips its only token block (no trained token) would hang the others; a real TPU has no such barrier.
    hidden, weight, targets, loss_mask = cross_entropy_inputs(
        seed=sum(mesh_shape), untrained_row=implementation != "pallas_tpu_interpret")
    expected, expected_grads = cross_entropy_sums_and_grads("reference")(hidden, weight, targets, loss_mask)

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    # the weight stored split like the model's head (embed over fsdp, vocab over tensor)
    args = [jax.device_put(hidden, rows), jax.device_put(weight, NamedSharding(mesh, P("fsdp", "tensor"))),
            jax.device_put(targets, rows), jax.device_put(loss_mask, rows)]
    step = cross_entropy_sums_and_grads(implementation)
    result, grads = step(*args)
    assert relative_error(result.loss_sum, expected.loss_sum) <= 1e-5
    assert float(result.token_count) == float(expected.token_count)
    assert float(result.correct_count) == float(expected.correct_count) > 0
    for name, got, want in zip(("d_hidden", "d_weight"), grads, expected_grads):
        assert relative_error(got, want) <= 1e-5, name

    data, fsdp, tensor = mesh_shape
    local_tokens = (ROWS // (data * fsdp), LENGTH // tensor)
    assert_kernels_run_per_device(step, args, [local_tokens + (HIDDEN,), (HIDDEN, VOCAB), local_tokens,
                                               local_tokens])
    # only the weight is gathered (into every device's kernel call), never the activations
    for shape in all_gather_shapes(step.lower(*args).compile().as_text()):
        assert shape.endswith(f",{VOCAB}"), f"all-gather of f32[{shape}]"


def test_cross_entropy_flat_tokens_split_over_every_axis():
    """[T, D] hidden (no row/sequence structure): the 256 tokens split over all 8 devices."""
    mesh = auto_mesh((2, 2, 2))
    hidden, weight, targets, loss_mask = cross_entropy_inputs(seed=5)
    hidden, targets, loss_mask = hidden.reshape(-1, HIDDEN), targets.reshape(-1), loss_mask.reshape(-1)
    expected, expected_grads = cross_entropy_sums_and_grads("reference")(hidden, weight, targets, loss_mask)
    tokens = NamedSharding(mesh, P(("data", "fsdp", "tensor")))
    args = [jax.device_put(hidden, tokens), jax.device_put(weight, NamedSharding(mesh, P())),
            jax.device_put(targets, tokens), jax.device_put(loss_mask, tokens)]
    step = cross_entropy_sums_and_grads("pallas_gpu_interpret")
    result, grads = step(*args)
    assert relative_error(result.loss_sum, expected.loss_sum) <= 1e-5
    assert float(result.correct_count) == float(expected.correct_count)
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) <= 1e-5
    local = ROWS * LENGTH // 8
    assert_kernels_run_per_device(step, args, [(local, HIDDEN), (HIDDEN, VOCAB), (local,), (local,)])
    assert all_gather_shapes(step.lower(*args).compile().as_text()) == []


def test_find_mesh_and_split_axes():
    mesh = auto_mesh((2, 2, 2))
    assert kernel_sharding.split_axes(mesh, 8, ("data", "fsdp")) == ("data", "fsdp")
    assert kernel_sharding.split_axes(mesh, 6, ("data", "fsdp")) == ("data",)
    assert kernel_sharding.split_axes(mesh, 3, ("data", "fsdp")) == ()
    assert kernel_sharding.split_axes(mesh, 4, ("data", "fsdp", "tensor"), taken=("data",)) == ("fsdp", "tensor")

    x = jnp.ones((8, 4))
    assert kernel_sharding.find_mesh(x) is None  # one device, no context mesh
    placed = jax.device_put(x, NamedSharding(mesh, P("data")))
    seen = {}

    @jax.jit
    def probe(a, b):
        seen["jit"] = kernel_sharding.find_mesh(a, b)
        seen["fresh"] = kernel_sharding.find_mesh(jnp.zeros(3))

        def remat_body(c):
            seen["scan+checkpoint"] = kernel_sharding.find_mesh(c)
            return c

        jax.lax.scan(lambda carry, _: (jax.checkpoint(remat_body)(carry), None), b * 2, None, length=2)

        def mapped(shard):
            seen["in_shard_map"] = kernel_sharding.find_mesh(shard)
            return shard

        jax.shard_map(mapped, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(b)
        return a

    probe(jnp.zeros(3), placed)
    assert seen["jit"].shape == mesh.shape
    assert seen["fresh"] is None
    assert seen["scan+checkpoint"].shape == mesh.shape
    assert seen["in_shard_map"] is None  # axes already manual: the caller maps, not us

    def in_context(a):
        seen["context"] = kernel_sharding.find_mesh(a)
        return a

    with jax.set_mesh(mesh):
        jax.jit(in_context)(jnp.zeros(3))
    assert seen["context"].shape == mesh.shape


def micro_batches(rng, accum, rows):
    """Batch-contract arrays [accum, rows, LENGTH]: packed segments, next-token targets within a segment."""
    segment_ids = np.stack([np.asarray(segments(rows, LENGTH, seed)) for seed in range(accum)])
    tokens = np.where(segment_ids > 0, rng.integers(1, VOCAB, segment_ids.shape), 0).astype(np.int32)
    positions = np.zeros_like(segment_ids)
    for index in np.ndindex(segment_ids.shape[:2]):
        for segment in set(segment_ids[index].tolist()) - {0}:
            where = segment_ids[index] == segment
            positions[index][where] = np.arange(where.sum())
    next_in_segment = np.zeros(segment_ids.shape, bool)
    next_in_segment[..., :-1] = (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., :-1] > 0)
    targets = np.where(next_in_segment, np.roll(tokens, -1, axis=-1), 0).astype(np.int32)
    loss_mask = (next_in_segment & (rng.random(tokens.shape) < 0.8)).astype(np.int32)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)


def test_train_step_with_pallas_kernels_on_mesh_matches_single_device_reference():
    """One SGD step of a tiny model, 2 micro-batches (lax.scan) and full remat (jax.checkpoint): the sharded
    step with Pallas attention and loss gives the loss and gradient of the one-device reference step."""
    from flax import nnx

    from sftjax.config import LoraSection, OptimSection
    from sftjax.models.config import ModelConfig
    from sftjax.models.decoder import Decoder
    from sftjax.sharding import batch_sharding, make_mesh, shard_model
    from sftjax.peft.lora import split_model
    from sftjax.train.optim import make_optimizer
    from sftjax.train.step import LossOptions, TrainState, make_train_step

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
                         rope_theta=10000.0, tie_word_embeddings=False)
    batch = micro_batches(np.random.default_rng(0), accum=2, rows=4)
    learning_rate = 1e3  # large, so that (old - new) / lr recovers the gradient to float32 precision
    optim = OptimSection(name="sgd", learning_rate=learning_rate, schedule="constant", no_decay=[])

    def loss_and_gradient(mesh, attention_name, cross_entropy_name):
        model = Decoder(config, rngs=nnx.Rngs(0), remat="full", attention_implementation=attention_name)
        if mesh is not None:
            shard_model(model, mesh)
        graphdef, trainable, frozen = split_model(model, LoraSection())
        shardings = None if mesh is None else jax.tree.map(lambda x: x.sharding, trainable)
        tx, schedule = make_optimizer(optim, 1)
        step = make_train_step(graphdef, tx, schedule, LossOptions(cross_entropy_implementation=cross_entropy_name),
                               donate=False, param_shardings=shardings)
        data = batch
        if mesh is not None:
            micro_rows = NamedSharding(mesh, P(None, *batch_sharding(mesh).spec))
            data = {key: jax.device_put(value, micro_rows) for key, value in batch.items()}
        state = TrainState.create(trainable, tx)
        new_state, metrics = step(state, frozen, data, jax.random.key(0))
        if mesh is not None:  # every kernel of the forward, the remat recompute and the backward is mapped
            calls = pallas_calls_and_maps(jax.make_jaxpr(step)(state, frozen, data, jax.random.key(0)).jaxpr)
            assert {call.params["name"] for call, _ in calls} >= {"sftjax_flash_attention_fwd",
                                                                   "sftjax_flash_attention_dq",
                                                                   "sftjax_ce_row_stats", "sftjax_ce_row_grads"}
            assert all(shard_map is not None for _, shard_map in calls)
        gradient = jax.tree.map(lambda old, new: (np.asarray(old) - np.asarray(new)) / learning_rate,
                                trainable, new_state.params)
        return metrics, gradient

    expected, expected_gradient = loss_and_gradient(None, "reference", "reference")
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    metrics, gradient = loss_and_gradient(mesh, "pallas_gpu_interpret", "pallas_gpu_interpret")
    assert float(metrics["trained_tokens"]) == float(expected["trained_tokens"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]), float(expected["loss"]), rtol=1e-5)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected_gradient)
    leaves = jax.tree.leaves(gradient)
    assert len(leaves) == len(expected_leaves)
    for (path, want), got in zip(expected_leaves, leaves):
        assert np.abs(want).max() > 1e-6, jax.tree_util.keystr(path)
        assert relative_error(got, want) <= 1e-4, jax.tree_util.keystr(path)
