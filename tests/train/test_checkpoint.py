"""Tests of sftjax.train.checkpoint: round trip, triggers, retention, crash safety, full disk, mesh changes, bad input.

The reference for every restored value is the array the test itself built (or rebuilt from the same formula in
another process), never a value produced by the checkpoint code.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftjax.train import checkpoint as ckpt
from sftjax.train import run_meta
from sftjax.errors import CheckpointError

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = {"model": {"path": "/models/tiny", "dtype": "float32"}, "lora": {"r": 8, "alpha": 16}, "optim": {"lr": 1e-3}}


def _state(seed: int = 0):
    key = jax.random.key(seed)
    params = {
        "layers": {"0": {"q_proj": {"lora_a": jax.random.normal(key, (32, 8)), "lora_b": jnp.zeros((8, 32))}}},
        "norm": jnp.arange(32, dtype=jnp.bfloat16),
    }
    opt_state = {"mu": jax.tree.map(lambda x: x + 1, params), "count": jnp.array(7, jnp.int32)}
    return {"params": params, "opt_state": opt_state}


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run_python(code: str, devices: int, timeout: float = 180, args=(), env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip_restores_state_rng_data_state_and_meta(tmp_path):
    state = _state()
    rng = jax.random.key(42)
    raw_rng = jax.random.PRNGKey(3)
    with ckpt.CheckpointManager(tmp_path / "ck", CONFIG, base_model={"path": "/models/tiny", "fingerprint": "ab"}) as m:
        assert m.restore_latest(ckpt.abstract_like(state)) is None
        assert m.save(5, state, data_state={"epoch": 1, "index": 17}, rng={"dropout": rng, "raw": raw_rng},
                      metrics={"loss": 1.5})
        m.wait()
        restored = m.restore_latest(ckpt.abstract_like(state))
    assert restored.step == 5
    _assert_trees_equal(restored.state, state)
    assert restored.data_state == {"epoch": 1, "index": 17}
    np.testing.assert_array_equal(jax.random.key_data(restored.rng["dropout"]), jax.random.key_data(rng))
    assert jax.random.key_impl(restored.rng["dropout"]) == jax.random.key_impl(rng)
    np.testing.assert_array_equal(restored.rng["raw"], raw_rng)
    # the restored key draws the same numbers as the original
    np.testing.assert_array_equal(jax.random.normal(restored.rng["dropout"], (4,)), jax.random.normal(rng, (4,)))
    assert restored.meta["config"] == CONFIG
    assert restored.meta["base_model"] == {"path": "/models/tiny", "fingerprint": "ab"}
    assert restored.meta["metrics"] == {"loss": 1.5}


def test_partial_restore_reads_only_requested_items(tmp_path):
    state = _state()
    with ckpt.CheckpointManager(tmp_path, CONFIG) as m:
        m.save(1, state)
        m.wait()
        restored = m.restore(1, {"params": ckpt.abstract_like(state["params"])})
    assert set(restored.state) == {"params"}
    _assert_trees_equal(restored.state["params"], state["params"])


def test_save_is_asynchronous_and_does_not_touch_state(tmp_path, monkeypatch):
    """save() returns while the write is still in flight, with the arrays already copied to host memory: the
    commit (orbax's rename of the temporary directory) is held back until the test has checked that nothing is
    committed yet and has deleted every array it passed in. A synchronous save would sit in the held commit
    inside save() and return with the step committed."""
    import asyncio
    import threading

    from orbax.checkpoint._src.path import atomicity

    release = threading.Event()
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self, *args, **kwargs):
        for _ in range(100):  # at most 5 s, so that a synchronous save fails the test instead of hanging it
            if release.is_set():
                break
            await asyncio.sleep(0.05)
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
    state = _state()
    before = jax.tree.map(np.asarray, state)
    with ckpt.CheckpointManager(tmp_path, CONFIG, async_save=True) as m:
        m.save(1, state)
        committed_on_return = (tmp_path / "1").exists()
        for leaf in jax.tree.leaves(state):  # e.g. donated to the next train step
            leaf.delete()
        release.set()
        m.wait()
        assert not committed_on_return, "save() returned after the checkpoint was committed: not asynchronous"
        assert (tmp_path / "1").is_dir() and m.all_steps == [1]
        restored = m.restore(1, ckpt.abstract_like(before))
    _assert_trees_equal(jax.tree.map(np.asarray, restored.state), before)


# ------------------------------------------------------------------------------------------------ crash safety

KILL_MID_SAVE = """
import os, pathlib, signal, sys
import asyncio
import jax, jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from sftjax.train.checkpoint import CheckpointManager

# hold every commit (the rename of the temporary directory) back a little, so that on a fast disk too the kill
# lands before step 2 is committed; the writes themselves are untouched
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def _slow_finalize(self, *args, **kwargs):
    await asyncio.sleep(0.5)
    return await _finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = _slow_finalize
root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path({root!r})
m = CheckpointManager(root, {{"model": {{"path": "m"}}}}, keep=5)
m.save(1, {{"params": {{"w": jnp.arange(64, dtype=jnp.float32)}}}}, data_state={{"index": 1}})
m.wait()
big = jax.random.normal(jax.random.key(0), (16 * 1024 * 1024,))  # 64 MiB: the write takes a while
big.block_until_ready()
m.save(2, {{"params": {{"w": big}}}}, data_state={{"index": 2}})
while True:  # wait until array bytes of step 2 are on disk, then die without any cleanup
    written = [p for p in root.glob("2.orbax-checkpoint-tmp*/params*/**/d/*") if p.is_file() and p.stat().st_size]
    if written or (root / "2").exists():
        break
print("committed" if (root / "2").exists() else "partial", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ck"
    proc = _run_python(KILL_MID_SAVE.format(root=str(root)), devices=1)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert proc.stdout.strip() == "partial", "the save finished before the kill; the test did not test anything"
    partial = list(root.glob("2.orbax-checkpoint-tmp*"))
    assert partial and not (root / "2").exists()
    with ckpt.CheckpointManager(root, {"model": {"path": "m"}}) as m:
        assert m.all_steps == [1]
        restored = m.restore_latest({"params": {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}})
        assert restored.step == 1 and restored.data_state == {"index": 1}
        np.testing.assert_array_equal(restored.state["params"]["w"], np.arange(64, dtype=np.float32))
        # the next save at that step works and the partial directory is gone
        m.save(2, {"params": {"w": jnp.ones(64)}})
        m.wait()
        assert m.all_steps == [1, 2]
    assert not list(root.glob("2.orbax-checkpoint-tmp*"))


def _mount_tiny_tmpfs(path: pathlib.Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_full_disk_fails_save_with_one_line_error_and_keeps_state(tmp_path):
    disk = tmp_path / "tiny"
    if not _mount_tiny_tmpfs(disk):
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root); the monkeypatched ENOSPC test covers the path")
    try:
        small = {"params": {"w": jnp.arange(16, dtype=jnp.float32)}}
        big = {"params": {"w": jax.random.normal(jax.random.key(0), (1024 * 1024,))}}  # 4 MiB of noise
        big_copy = np.asarray(big["params"]["w"]).copy()
        m = ckpt.CheckpointManager(disk / "ck", CONFIG)
        m.save(1, small)
        m.wait()
        with pytest.raises(CheckpointError) as info:
            m.save(2, big)
            m.wait()
        message = str(info.value)
        assert "\n" not in message and "no space left on device" in message and "step 2" in message
        np.testing.assert_array_equal(np.asarray(big["params"]["w"]), big_copy)
        assert m.all_steps == [1] and not list((disk / "ck").glob("2.*"))  # the partial write was removed
        restored = m.restore_latest(ckpt.abstract_like(small))
        np.testing.assert_array_equal(restored.state["params"]["w"], np.arange(16, dtype=np.float32))
        m.save(3, small)  # a later save that fits works again
        m.close()
        assert m.all_steps == [1, 3]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_write_error_reported_as_one_line(tmp_path, monkeypatch):
    """Same path as the full disk without a tmpfs: the JSON writer raises ENOSPC."""
    import errno

    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    m = ckpt.CheckpointManager(tmp_path, CONFIG, async_save=True)
    state = {"params": {"w": jnp.arange(4.0)}}

    async def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space, raising=True)
    with pytest.raises(CheckpointError, match=r"step 7 .*no space left on device"):
        m.save(7, state)
        m.wait()
    monkeypatch.undo()
    assert m.all_steps == []
    m.save(8, state)
    m.close()
    assert m.all_steps == [8]


# ------------------------------------------------------------------------------------------------ mesh changes

WRITE_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sftjax.train.checkpoint import CheckpointManager
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
w = jax.device_put(jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) * 0.375 - 5, NamedSharding(mesh, P("fsdp", "data")))
b = jax.device_put(jnp.arange(8, dtype=jnp.bfloat16), NamedSharding(mesh, P("data")))
assert len(w.sharding.device_set) == 8
with CheckpointManager({root!r}, {{"model": {{"path": "m"}}}}) as m:
    m.save(3, {{"params": {{"w": w, "b": b}}, "opt_state": {{"count": jnp.array(3)}}}}, data_state={{"index": 9}})
print("ok")
"""

READ_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sftjax.train.checkpoint import CheckpointManager
n = jax.device_count()
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
sd = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
abstract = {{"params": {{"w": sd((16, 8), jnp.float32, P("fsdp")), "b": sd((8,), jnp.bfloat16, P())}},
            "opt_state": {{"count": sd((), jnp.int32, P())}}}}
with CheckpointManager({root!r}, {{"model": {{"path": "m"}}}}) as m:
    r = m.restore_latest(abstract)
w = r.state["params"]["w"]
assert len(w.sharding.device_set) == n and w.sharding.spec == P("fsdp"), w.sharding
np.testing.assert_array_equal(np.asarray(w), np.arange(16 * 8, dtype=np.float32).reshape(16, 8) * np.float32(0.375) - 5)
np.testing.assert_array_equal(np.asarray(r.state["params"]["b"]), np.arange(8).astype(jnp.bfloat16))
assert int(r.state["opt_state"]["count"]) == 3 and r.step == 3 and r.data_state == {{"index": 9}}
print("ok", n)
"""


def test_checkpoint_from_8_devices_restores_on_4_and_1(tmp_path):
    root = str(tmp_path / "ck")
    written = _run_python(WRITE_SHARDED.format(root=root), devices=8)
    assert written.returncode == 0 and written.stdout.strip() == "ok", written.stderr[-3000:]
    sharding_meta = json.loads((tmp_path / "ck" / "3" / "params" / "_sharding").read_text())
    assert any("data" in json.dumps(v) and "fsdp" in json.dumps(v) for v in sharding_meta.values())
    for devices in (4, 1):
        read = _run_python(READ_SHARDED.format(root=root), devices=devices)
        assert read.returncode == 0 and read.stdout.strip() == f"ok {devices}", read.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ bad input


def test_incompatible_config_names_the_differing_fields(tmp_path):
    state = _state()
    with ckpt.CheckpointManager(tmp_path, CONFIG) as m:
        m.save(1, state)
    other = json.loads(json.dumps(CONFIG))
    other["lora"]["r"] = 16
    other["model"]["path"] = "/models/other"
    other["optim"]["lr"] = 5.0  # not a compatibility field: allowed
    with ckpt.CheckpointManager(tmp_path, other) as m:
        with pytest.raises(CheckpointError) as info:
            m.restore_latest(ckpt.abstract_like(state))
    message = str(info.value)
    assert "\n" not in message and "lora.r: 8 -> 16" in message and "model.path" in message
    assert "optim.lr" not in message
    lr_only = json.loads(json.dumps(CONFIG))
    lr_only["optim"]["lr"] = 5.0
    with ckpt.CheckpointManager(tmp_path, lr_only) as m:
        assert m.restore_latest(ckpt.abstract_like(state)).step == 1


def test_state_shape_mismatch_names_the_leaf(tmp_path):
    state = _state()
    with ckpt.CheckpointManager(tmp_path, CONFIG) as m:
        m.save(1, state)
        m.wait()
        wrong = ckpt.abstract_like(state)
        wrong["params"]["layers"]["0"]["q_proj"]["lora_a"] = jax.ShapeDtypeStruct((32, 16), jnp.float32)
        with pytest.raises(CheckpointError, match=r"q_proj/lora_a shape \(32, 8\) -> \(32, 16\)"):
            m.restore(1, wrong)
        with pytest.raises(CheckpointError, match=r"no item\(s\) \['ema'\]"):
            m.restore(1, {"ema": ckpt.abstract_like(state["params"])})


def test_foreign_and_corrupt_directories(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"not a checkpoint")
    (foreign / "12").mkdir()
    with pytest.raises(CheckpointError, match="no sftjax checkpoint found in .*foreign"):
        ckpt.resolve_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "missing")

    state = _state()
    root = tmp_path / "ck"
    with ckpt.CheckpointManager(root, CONFIG) as m:
        m.save(1, state)
        m.save(2, state)
    # corrupt step 2: its array data files are gone; its meta is garbage JSON in step 1
    for data_file in (root / "2" / "params").rglob("d/*"):
        data_file.unlink()
    (root / "1" / "meta" / "metadata").write_text("{not json")
    with ckpt.CheckpointManager(root, CONFIG) as m:
        with pytest.raises(CheckpointError) as info:
            m.restore(2, ckpt.abstract_like(state))
        assert "\n" not in str(info.value) and str(root / "2") in str(info.value)
        with pytest.raises(CheckpointError, match=r"checkpoint .*/1 is corrupt"):
            m.restore(1, ckpt.abstract_like(state))

    # a plain orbax checkpoint written by another tool, inside the run's checkpoint directory
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "other") as other:
        other.save(4, args=ocp.args.StandardSave({"w": np.ones(3)}))
    with ckpt.CheckpointManager(tmp_path / "other", CONFIG) as m:
        with pytest.raises(CheckpointError, match=r"/other/4 is not an sftjax checkpoint"):
            m.restore_latest(ckpt.abstract_like(state))


def test_resume_modes(tmp_path):
    state = _state()
    run = tmp_path / "run"
    with ckpt.CheckpointManager(run / "checkpoints", CONFIG, keep=None) as m:
        m.save(1, state, data_state={"i": 1})
        m.save(2, state, data_state={"i": 2})
    abstract = ckpt.abstract_like(state)
    fresh = ckpt.CheckpointManager(tmp_path / "new_run" / "checkpoints", CONFIG)
    assert ckpt.restore_for_resume("never", fresh, abstract) is None
    assert ckpt.restore_for_resume("auto", fresh, abstract) is None  # nothing there yet: start fresh
    assert ckpt.restore_for_resume(str(run), fresh, abstract).data_state == {"i": 2}
    assert ckpt.restore_for_resume(str(run / "checkpoints" / "1"), fresh, abstract).data_state == {"i": 1}
    fresh.close()
    with ckpt.CheckpointManager(run / "checkpoints", CONFIG) as same:
        assert ckpt.restore_for_resume("auto", same, abstract).step == 2
    with pytest.raises(CheckpointError):
        ckpt.restore_for_resume(str(tmp_path / "nope"), same, abstract)


def test_fingerprint_changes_with_content(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"x" * 3000)
    first = run_meta.fingerprint_model(model)
    assert first == run_meta.fingerprint_model(model)
    (model / "model.safetensors").write_bytes(b"x" * 2999 + b"y")
    assert run_meta.fingerprint_model(model) != first


def test_bad_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="save_every_steps"):
        ckpt.CheckpointManager(tmp_path, save_every_steps=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ckpt.CheckpointManager(tmp_path / "file")
    with ckpt.CheckpointManager(tmp_path / uuid.uuid4().hex) as m:
        with pytest.raises(ValueError, match="reserved"):
            m.save(1, {"meta": {"w": jnp.ones(2)}})


def test_nnx_state_with_list_indices_round_trips(tmp_path):
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.LoRA(8, 2, 8, rngs=rngs) for _ in range(2)])
            self.head = nnx.Linear(8, 4, rngs=rngs)

    model = Tiny(nnx.Rngs(0))
    lora_state = nnx.state(model, nnx.LoRAParam)
    with ckpt.CheckpointManager(tmp_path, CONFIG) as m:
        m.save(1, {"params": lora_state})
        m.wait()
        other = Tiny(nnx.Rngs(1))
        restored = m.restore(1, {"params": ckpt.abstract_like(nnx.state(other, nnx.LoRAParam))})
    nnx.update(other, restored.state["params"])
    for mine, theirs in zip(model.layers, other.layers):
        np.testing.assert_array_equal(mine.lora_a[...], theirs.lora_a[...])
    assert not np.array_equal(model.head.kernel[...], other.head.kernel[...])  # only the filtered part restored


def test_checkpoint_config_section(tmp_path):
    from sftjax.errors import ConfigError

    from sftjax.config import CheckpointSection

    section = CheckpointSection.from_dict({"save_every_steps": 5, "keep": 2, "resume": "never"})
    with ckpt.manager_for(section, tmp_path / "run", CONFIG) as m:
        assert m.directory == (tmp_path / "run" / "checkpoints").absolute()
        assert m.should_save(10) and not m.should_save(11)
    with pytest.raises(ConfigError, match="unknown key checkpoint.every"):
        CheckpointSection.from_dict({"every": 5})
    with pytest.raises(ConfigError, match="checkpoint.keep=0"):
        CheckpointSection.from_dict({"keep": 0})


# ------------------------------------------------------------------------------------------------ exact resume

TOY_TRAINING = """
import json, os, pathlib, signal, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from sftjax.train.checkpoint import CheckpointManager, abstract_like, train_state_from_items, train_state_items
from sftjax.config import LoraSection, OptimSection
from sftjax.models.config import ModelConfig
from sftjax.models.decoder import Decoder
from sftjax.peft.lora import apply_lora, split_model
from sftjax.train.optim import make_optimizer
from sftjax.train.step import LossOptions, TrainState, make_train_step

mode, run_dir, total, kill_after = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_position_embeddings=32)
model = Decoder(config, rngs=nnx.Rngs(0))
lora = LoraSection(enabled=mode == "lora", r=4, alpha=8.0, dropout=0.1, target_modules="all-linear")
apply_lora(model, lora, rngs=nnx.Rngs(1))
graphdef, trainable, frozen = split_model(model, lora)
tx, schedule = make_optimizer(OptimSection(learning_rate=1e-2, warmup_steps=2), total)
train_step = make_train_step(graphdef, tx, schedule, LossOptions(dropout=lora.enabled), max_grad_norm=1.0)
state = TrainState.create(trainable, tx)
rng = jax.random.key(1234)

# 10 synthetic rows, 2 per batch, reshuffled every epoch: a resume lands mid-epoch
rows = np.random.RandomState(0).randint(1, 64, size=(10, 17)).astype(np.int32)
def batch_at(data_state):
    order = np.random.RandomState(100 + data_state["epoch"]).permutation(len(rows))
    chosen = rows[order[data_state["index"]: data_state["index"] + 2]]
    tokens, targets = chosen[:, :-1], chosen[:, 1:]
    return {"tokens": tokens, "targets": targets, "loss_mask": (targets % 3 != 0).astype(np.int32),
            "segment_ids": np.ones_like(tokens), "positions": np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape)}
def advance(data_state):
    index = data_state["index"] + 2
    return {"epoch": data_state["epoch"] + index // len(rows), "index": index % len(rows)}

as_items = train_state_items

manager = CheckpointManager(run_dir / "checkpoints", {"model": {"init": "tiny"}, "lora": vars(lora)},
                            save_every_steps=3, keep=2)
data_state, start = {"epoch": 0, "index": 0}, 0
restored = manager.restore_latest(abstract_like(as_items(state)))
if restored is not None:
    state = train_state_from_items(state, restored.state)
    data_state, rng, start = restored.data_state, restored.rng, restored.step
    print("resumed", start, flush=True)
with open(run_dir / "losses.jsonl", "a") as log:
    for step in range(start + 1, total + 1):
        rng, step_rng = jax.random.split(rng)
        state, metrics = train_step(state, frozen, {k: jnp.asarray(v) for k, v in batch_at(data_state).items()},
                                    step_rng)
        data_state = advance(data_state)
        log.write(json.dumps({"step": step, "loss": float(metrics["loss"]).hex()}) + "\\n")
        log.flush()
        manager.maybe_save(step, as_items(state), data_state=data_state, rng=rng)
        if step == kill_after:
            manager.wait()
            os.kill(os.getpid(), signal.SIGKILL)
manager.save(total, as_items(state), data_state=data_state, rng=rng)
manager.close()
flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(as_items(state))[0]}
np.savez(run_dir / "final.npz", **flat)
print("done", flush=True)
"""


def _toy_losses(run_dir: pathlib.Path) -> dict[int, str]:
    lines = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in lines}


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A toy loop that threads its RNG through the checkpoint (LoRA dropout); tests/train/test_resume.py does the same
    with the real Trainer for LoRA and full fine-tuning."""
    mode = "lora"
    total = 8
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    for run_dir in (reference, crashed):
        run_dir.mkdir()
    # the three processes compile the same step: share it through JAX's persistent cache (test speed only)
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    proc = _run_python(TOY_TRAINING, devices=1, args=[mode, reference, total, -1], env_extra=cache)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]
    proc = _run_python(TOY_TRAINING, devices=1, args=[mode, crashed, total, 5], env_extra=cache)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert sorted(_toy_losses(crashed)) == [1, 2, 3, 4, 5]
    proc = _run_python(TOY_TRAINING, devices=1, args=[mode, crashed, total, -1], env_extra=cache)
    assert proc.returncode == 0 and "resumed 3" in proc.stdout, proc.stderr[-3000:]

    expected = _toy_losses(reference)
    lines = (crashed / "losses.jsonl").read_text().splitlines()
    resumed = {row["step"]: row["loss"] for row in map(json.loads, lines[5:])}
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    assert resumed == {step: expected[step] for step in range(4, 9)}  # float.hex: bit-identical
    assert len(set(expected.values())) == total  # the loss moves: the comparison means something
    final_ref, final_resumed = np.load(reference / "final.npz"), np.load(crashed / "final.npz")
    assert sorted(final_ref.files) == sorted(final_resumed.files)
    for name in final_ref.files:
        np.testing.assert_array_equal(final_resumed[name], final_ref[name], err_msg=name)


def test_train_state_items_round_trip(tmp_path):
    from sftjax.train.step import TrainState
    import optax

    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    state = TrainState.create(params, optax.adam(1e-2))
    state = state.replace(step=jnp.array(5, jnp.int32))
    items = ckpt.train_state_items(state)
    assert set(items) == {"params", "opt_state", "counters"}
    with ckpt.CheckpointManager(tmp_path, CONFIG) as m:
        m.save(5, items)
        m.wait()
        fresh = TrainState.create({"w": jnp.zeros((2, 3))}, optax.adam(1e-2))
        restored = m.restore_latest(ckpt.abstract_like(ckpt.train_state_items(fresh)))
    back = ckpt.train_state_from_items(fresh, restored.state)
    assert int(back.step) == 5
    _assert_trees_equal(back.params, params)
    _assert_trees_equal(back.opt_state, state.opt_state)
