"""Config loading: YAML + overrides -> validated dataclasses; every bad value is a one-line ConfigError."""

from __future__ import annotations

import pathlib

import pytest

from sftjax.config import apply_overrides, config_from_dict, load_config
from sftjax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE = {
    "model": {"path": "smollm2-135m-instruct"},
    "data": {"sources": ["train.jsonl"]},
    "train": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 4},
}


def build(*overrides):
    import copy

    return config_from_dict(apply_overrides(copy.deepcopy(BASE), list(overrides)))


def one_line_error(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        build(*overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.accum_steps >= 1
    assert cfg.data is not None


def test_defaults_types_and_overrides():
    cfg = build("optim.learning_rate=3e-4", "lora.enabled=true", "lora.target_modules=[q_proj, v_proj]",
                "train.mesh.fsdp=2", "checkpoint.save_every_steps=5")
    assert cfg.optim.learning_rate == 3e-4 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.lora.enabled and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.accum_steps == 2 and cfg.train.mesh.fsdp == 2
    assert cfg.checkpoint.save_every_steps == 5 and cfg.to_dict()["checkpoint"]["save_every_steps"] == 5
    assert cfg.data.sources[0].path == "train.jsonl"
    assert cfg.to_dict()["optim"]["learning_rate"] == 3e-4
    assert build("optim.learning_rate=1").optim.learning_rate == 1.0  # int accepted for a float
    assert build().lora.target_modules == "all-linear"


def test_unknown_key_suggests_closest():
    assert "did you mean optim.learning_rate" in one_line_error("optim.learning_rat=1e-4")
    assert "did you mean 'optim'" in one_line_error("optimizer.name=sgd")


@pytest.mark.parametrize("override, words", [
    ("train.steps=ten", ["train.steps", "'ten'", "integer"]),
    ("lora.enabled=maybe", ["lora.enabled", "true or false"]),
    ("optim.learning_rate=-0.001", ["optim.learning_rate", "-0.001", "> 0"]),
    ("optim.name=adam", ["optim.name", "adamw, adafactor, sgd"]),
    ("model.remat=everything", ["model.remat", "none, full, save_dots"]),
    ("train.micro_batch_size=3", ["train.micro_batch_size=3", "global_batch_size=8"]),
    ("lora.r=0", ["lora.r"]),
    ("train.mesh.data=0", ["train.mesh.data"]),
])
def test_bad_values_name_key_value_and_allowed(override, words):
    message = one_line_error(override)
    for word in words:
        assert word in message, message


def test_batch_must_split_over_devices():
    cfg = build("train.micro_batch_size=4")
    assert cfg.check_devices(4) == {"data": 4, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="not divisible by the 8 batch shards"):
        cfg.check_devices(8)
    cfg = build("train.mesh.tensor=3")
    with pytest.raises(ConfigError, match="multiple of 3 devices"):
        cfg.check_devices(8)


def test_missing_pieces_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        config_from_dict({"data": {"sources": ["x"]}, "train": {"steps": 1}})
    with pytest.raises(ConfigError, match="train.steps or train.epochs"):
        config_from_dict({"model": {"path": "x"}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="data.sources"):
        build("data.sources=[]")


def test_checkpoint_section_is_validated_at_load():
    with pytest.raises(ConfigError, match="every_steps"):
        build("checkpoint.every_steps=5")


def test_qlora_dora_init_and_loraplus_keys():
    cfg = build("lora.enabled=true", "model.quantize=nf4", "model.double_quant=true", "lora.use_dora=true",
                "lora.init=pissa", "lora.lr_ratio=16")
    assert (cfg.model.quantize, cfg.model.double_quant) == ("nf4", True)
    assert (cfg.lora.use_dora, cfg.lora.init, cfg.lora.lr_ratio) == (True, "pissa", 16.0)
    assert build().model.quantize == "none" and build().lora.lr_ratio is None and build().lora.init == "default"


@pytest.mark.parametrize("override, words", [
    (["lora.enabled=true", "lora.lr_ratio=0"], ["lora.lr_ratio=0", "> 0"]),
    (["lora.enabled=true", "lora.lr_ratio=-2"], ["lora.lr_ratio=-2", "> 0"]),
    (["model.quantize=nf4"], ["model.quantize=nf4", "lora.enabled=true", "full fine-tuning"]),
    (["model.quantize=int4"], ["model.quantize", "int4", "none", "nf4", "int8"]),
    (["lora.enabled=true", "model.quantize=int8", "model.double_quant=true"], ["model.double_quant", "nf4"]),
    (["lora.enabled=true", "lora.init=loftq"], ["lora.init", "loftq", "pissa", "olora"]),
    (["lora.use_dora=true"], ["lora.use_dora", "lora.enabled=true"]),
    (["lora.lr_ratio=4"], ["lora.lr_ratio", "lora.enabled=true"]),
])
def test_qlora_dora_and_loraplus_refusals(override, words):
    message = one_line_error(*override)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("override, expected", [
    ("model.moe={router_aux_coef: 0.1}", "model.moe has unknown key 'router_aux_coef'; did you mean "
                                         "'router_aux_loss_coef'?"),
    ("model.moe={implementation: triton}", "model.moe.implementation='triton' is not one of auto, ragged_dot"),
    ("model.moe={router_z_loss_coef: -1}", "model.moe.router_z_loss_coef=-1 must be a number >= 0"),
])
def test_moe_switches_are_checked(override, expected):
    assert expected in one_line_error(override)
