"""``plan`` and AOT compilation build the same run as ``train``: the abstract program (no weights read, the path of
``sftjax plan`` and ``plan --compile``) has exactly the shapes, dtypes and shardings of the state the trainer
really builds and trains, for LoRA and for full fine-tuning, with scan over layers and on an 8-device mesh."""

from __future__ import annotations

import pathlib

import jax
import pytest

from sftjax.config import load_config
from sftjax.plan.estimate import abstract_mesh
from sftjax.train.program import build_program
from sftjax.train.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def _layout(tree) -> dict:
    """path -> (shape, dtype, partition spec) of every array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "shape"):
            continue
        spec = tuple(leaf.sharding.spec) if hasattr(leaf.sharding, "spec") else None
        out[jax.tree_util.keystr(path)] = (tuple(leaf.shape), str(leaf.dtype), spec)
    return out


def _without_trailing_nones(spec):
    spec = list(spec or ())
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


def _normalized(layout: dict) -> dict:
    return {k: (shape, dtype, _without_trailing_nones(spec)) for k, (shape, dtype, spec) in layout.items()}


@pytest.mark.parametrize("extra", [
    ["lora.enabled=true", "lora.r=4", "lora.alpha=8"],
    ["lora.enabled=false", "model.scan_layers=true"],
    ["lora.enabled=true", "lora.r=4", "model.quantize=nf4", "model.double_quant=true", "lora.use_dora=true",
     "lora.init=pissa", "lora.lr_ratio=4", "model.scan_layers=true"],
], ids=["lora", "full-scanned", "qlora-dora-pissa-scanned"])
def test_abstract_program_equals_the_trainers(assets_dir, tmp_path, extra):
    assert jax.device_count() >= 8, "tests/conftest.py gives the session 8 fake CPU devices"
    overrides = [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
                 f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
                 f"train.output_dir={tmp_path}", "train.progress=false", "train.tensorboard=false",
                 "train.mesh.data=2", "train.mesh.fsdp=2", "train.mesh.tensor=2", "train.steps=3", *extra]
    cfg = load_config(TINY, overrides)
    trainer = Trainer(cfg)
    real = trainer.program
    planned = build_program(cfg, mesh=abstract_mesh(dict(real.mesh.shape)), total_steps=real.total_steps,
                            abstract=True, vocab_size=real.model_config.vocab_size)
    assert planned.model_config == real.model_config
    assert planned.lora_targets == real.lora_targets
    for name in ("trainable", "frozen", "state"):
        want, got = _normalized(_layout(getattr(real, name))), _normalized(_layout(getattr(planned, name)))
        assert got.keys() == want.keys(), (name, sorted(set(got) ^ set(want))[:5])
        different = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert not different, (name, list(different.items())[:5])
    assert any(spec for _, _, spec in _normalized(_layout(real.state)).values())  # something really is sharded
    assert planned.num_trainable == real.num_trainable and planned.num_params == real.num_params
