"""Every TPU slice of sftjax/accelerators.py, as libtpu describes it: device count, kind, hosts, megacore."""

from __future__ import annotations

import pytest

from sftjax import accelerators


@pytest.mark.parametrize("name", list(accelerators.TPU_SLICES))
def test_slice_devices(libtpu, name):
    tpu = accelerators.TPU_SLICES[name]
    devices = accelerators.tpu_topology_devices(name)
    assert len(devices) == tpu.num_chips
    assert {d.platform for d in devices} == {"tpu"}
    assert {d.device_kind for d in devices} == {tpu.chip.device_kinds[0]}
    assert len({d.process_index for d in devices}) == tpu.num_hosts
    # one device per chip: megacore chips (v4, v5p) show one device, not one per TensorCore
    assert {getattr(d, "core_on_chip", 0) for d in devices} == {0}
    assert len({tuple(d.coords) for d in devices}) == tpu.num_chips
