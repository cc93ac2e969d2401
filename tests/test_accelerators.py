"""The accelerator table and target lookup (sftjax/accelerators.py); needs no libtpu.

The table is checked against facts stated independently of it: the cloud's naming rule (the suffix counts
TensorCores on v4/v5p, chips on v5e/v6e), the chip grid of each topology string, and the device kinds jax
reports. What libtpu itself makes of the table is checked by tests/preflight/test_tpu_topologies.py.
"""

from __future__ import annotations

import math

import pytest

from sftjax import accelerators
from sftjax.errors import ConfigError

SUFFIX_COUNTS_CORES = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
REPORTED_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e",
                  "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100",
                  "NVIDIA H100 PCIe": "h100", "NVIDIA A10": "a10"}


@pytest.mark.parametrize("name", list(accelerators.TPU_SLICES))
def test_tpu_slice_names_topologies_and_counts_agree(name):
    tpu = accelerators.TPU_SLICES[name]
    generation, count = name.split("-")
    assert tpu.chip.name == generation and tpu.topology.split(":")[0] == generation
    assert int(count) == tpu.num_chips * SUFFIX_COUNTS_CORES[generation]
    grid = [int(side) for side in tpu.topology.split(":")[1].split("x")]
    assert math.prod(grid) == tpu.num_chips
    per_host = math.prod(tpu.chips_per_host)
    assert tpu.num_chips % per_host == 0 and tpu.num_hosts * per_host == tpu.num_chips
    kwargs = tpu.topology_kwargs()
    assert kwargs["topology_name"] == tpu.topology and kwargs["chips_per_host_bounds"] == list(tpu.chips_per_host)
    assert ("chip_config_name" in kwargs) == (generation == "v4")


def test_chip_facts_are_datasheet_scale():
    for chip in accelerators.CHIPS.values():
        assert chip.platform in ("tpu", "gpu")
        assert 15 * 2**30 < chip.hbm_bytes < 150 * 2**30
        assert 1e14 < chip.peak_bf16_flops < 1e15
        assert 5e11 < chip.hbm_bandwidth < 5e12
    assert accelerators.H200.hbm_bytes > accelerators.H100.hbm_bytes
    assert accelerators.TPU_V5P.hbm_bytes == 95 * 2**30


@pytest.mark.parametrize("kind, chip", list(REPORTED_KINDS.items()))
def test_chip_for_device_kind(kind, chip):
    assert accelerators.chip_for_device_kind(kind).name == chip


def test_unknown_device_kind_is_none():
    assert accelerators.chip_for_device_kind("cpu") is None
    assert accelerators.chip_for_device_kind("TPU v9 ultra") is None


def test_lookup_target():
    assert accelerators.lookup_target("V5P-8") is accelerators.TPU_SLICES["v5p-8"]
    assert accelerators.lookup_target("h100").compute_capability == "9.0"
    with pytest.raises(ConfigError) as caught:
        accelerators.lookup_target("v5p-9")
    message = str(caught.value)
    assert "\n" not in message and "'v5p-9'" in message
    for name in accelerators.target_names():
        assert name in message


def test_tpu_topology_devices_refuses_gpu_and_unknown_targets():
    with pytest.raises(ConfigError, match="is a GPU; TPU topologies are: v4-8"):
        accelerators.tpu_topology_devices("h200")
    with pytest.raises(ConfigError, match="unknown target"):
        accelerators.tpu_topology_devices("tpu")


def test_missing_libtpu_is_one_line_naming_the_install(monkeypatch):
    import importlib.util

    import jax

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(ConfigError) as caught:
        accelerators.tpu_topology_devices("v5e-4")
    message = str(caught.value)
    assert "\n" not in message and f'pip install "jax[tpu]=={jax.__version__}"' in message and "v5e-4" in message


def test_gpu_abstract_device():
    device = accelerators.gpu_abstract_device("h100")
    assert device.platform == "gpu" and device.device_kind == "NVIDIA H100 80GB HBM3"
    with pytest.raises(ConfigError, match="is a TPU slice"):
        accelerators.gpu_abstract_device("v6e-8")
