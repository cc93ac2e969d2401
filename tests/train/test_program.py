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


MOE_INIT = ["model.init.moe={expert_intermediate_size: 32, num_experts: 4, num_experts_per_tok: 2, "
            "router_aux_loss_coef: 0.02}", "model.init.mlp_only_layers=[0]", "model.init.architecture=Qwen3MoeForCausalLM",
            "model.init.family=qwen3_moe", "model.init.qk_norm=true"]


def test_moe_run_trains_with_router_losses_and_experts_split_over_fsdp(assets_dir, tmp_path):
    """A random-init MoE model through the Trainer on a (data 2, fsdp 2, tensor 2) mesh: the experts are split over
    fsdp, the run-time model.moe switches reach the loss, the abstract program equals the real one, and the logged
    metrics carry both router losses and every expert's token count."""
    import json

    overrides = [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}",
                 f"data.sources=[{assets_dir / 'datasets' / 'instruction' / 'alpaca_tiny.json'}]",
                 f"train.output_dir={tmp_path}", "train.progress=false", "train.tensorboard=false",
                 "train.mesh.data=2", "train.mesh.fsdp=2", "train.mesh.tensor=2", "train.steps=2", "train.log_every=1",
                 "train.eval_every=0", *MOE_INIT, "model.moe.router_z_loss_coef=0.001",
                 "model.moe.implementation=ragged_dot"]
    cfg = load_config(TINY, overrides)
    trainer = Trainer(cfg)
    real = trainer.program
    assert real.model_config.moe.router_z_loss_coef == 0.001 and real.model_config.moe_layers == (1,)
    assert (real.loss.router_aux_loss_coef, real.loss.router_z_loss_coef) == (0.02, 0.001)
    kernel = real.model.layers[1].mlp.experts.up_proj.kernel.get_value()
    assert kernel.addressable_shards[0].data.shape[0] == 2  # 4 experts over fsdp=2
    planned = build_program(cfg, mesh=abstract_mesh(dict(real.mesh.shape)), total_steps=real.total_steps,
                            abstract=True, vocab_size=real.model_config.vocab_size)
    assert _normalized(_layout(planned.state)) == _normalized(_layout(real.state))
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "router_aux_loss" in r]
    assert train, records[:3]
    last = train[-1]
    assert last["router_aux_loss"] > 0 and last["router_z_loss"] > 0
    assert sum(last[f"expert_tokens_{e}"] for e in range(4)) > 0


def test_expert_axis_that_does_not_divide_the_experts_fails_before_compiling(assets_dir, tmp_path):
    from sftjax.errors import ConfigError
    from sftjax.train.program import check_expert_mesh, model_config_for

    cfg = load_config(TINY, [f"tokenizer.path={assets_dir / 'tokenizers' / 'smollm2'}", *MOE_INIT,
                             "model.init.moe.num_experts=6", "train.mesh.data=2", "train.mesh.fsdp=4",
                             "train.mesh.tensor=1"])
    config = model_config_for(cfg, vocab_size=64)
    with pytest.raises(ConfigError, match=r"model.moe.num_experts=6 is not divisible .* train.mesh.fsdp dividing 6"):
        check_expert_mesh(config, abstract_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    with pytest.raises(ConfigError, match="not divisible"):
        build_program(cfg, mesh=abstract_mesh({"data": 2, "fsdp": 4, "tensor": 1}), total_steps=2, abstract=True,
                      vocab_size=64)
