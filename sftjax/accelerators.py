"""The accelerators sftjax plans and compiles for: chip facts and the devices of a target, without owning one.

A *chip* carries what the planners need from the vendor datasheets: memory per chip, dense bf16 peak FLOP/s and
memory bandwidth. A *target* is what a user names on the command line: a TPU slice (``v5p-8``: chip, topology,
chip count) or a GPU (``h100``).

TPU slices are turned into real TPU devices on any machine that has libtpu (``pip install "jax[tpu]==<jax>"``):
``jax.experimental.topologies.get_topology_desc`` describes the slice, and programs jitted over a mesh of its
devices can be lowered and compiled by XLA's TPU compiler (``.lower(...).compile()``, never executed). The
arguments each slice needs were found by trying them against libtpu 0.0.48 (jax 0.11.2):

- the topology string is ``"<generation>:<chip grid>"`` (``v5p:2x2x1``, ``v5e:2x4``); the ``v5p-8`` style names
  are refused by libtpu;
- ``chips_per_host_bounds`` (a list of 3 ints) must divide the grid; the default ``[2, 2, 1]`` refuses one-chip
  slices and splits an 8-chip v5e/v6e host into two processes, so every slice states the host shape of the
  real machine (``[1, 1, 1]`` for one chip, ``[2, 4, 1]`` for the 8-chip single hosts);
- v4 chips have two TensorCores that a v4 machine runs as one device ("megacore"); libtpu's default chip config
  for v4 shows each core as a device (8 devices for 4 chips), ``chip_config_name="megacore"`` gives the 4 devices
  a v4-8 really has. v5p is megacore by default.

The suffix of a slice name counts TensorCores for v4 and v5p (``v5p-8`` is 4 chips) and chips for v5e and v6e
(``v5e-8`` is 8 chips), as the cloud names them.

GPUs cannot be described that way on a CPU machine; :func:`gpu_abstract_device` gives the abstract device under
which jax lowers Pallas-Triton kernels for the GPU's compute capability (lowering only, see
``pallas_kernels/lowering.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util

from sftjax.errors import ConfigError

GiB = 1 << 30
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (a TPU chip in megacore mode, or one GPU): what a device of it offers."""

    name: str
    platform: str  # "tpu" or "gpu"
    hbm_bytes: int
    peak_bf16_flops: float  # dense, no sparsity
    hbm_bandwidth: float  # bytes per second
    device_kinds: tuple[str, ...]  # what jax devices of this chip report as device_kind


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU slice target: ``num_chips`` chips laid out as ``topology``, ``chips_per_host`` chips per host."""

    name: str
    chip: Chip
    topology: str
    num_chips: int
    chips_per_host: tuple[int, int, int]
    chip_config: str | None = None

    @property
    def num_hosts(self) -> int:
        per_host = self.chips_per_host[0] * self.chips_per_host[1] * self.chips_per_host[2]
        return self.num_chips // per_host

    def topology_kwargs(self) -> dict:
        """The keyword arguments of ``get_topology_desc`` for this slice."""
        kwargs = dict(platform="tpu", topology_name=self.topology, chips_per_host_bounds=list(self.chips_per_host))
        if self.chip_config is not None:
            kwargs["chip_config_name"] = self.chip_config
        return kwargs


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """A GPU target: one chip per device; ``compute_capability`` as CUDA writes it ("9.0")."""

    name: str
    chip: Chip
    compute_capability: str

    @property
    def device_kind(self) -> str:
        return self.chip.device_kinds[0]


# Vendor datasheets. TPU memory in GiB as Google states it; GPU memory as CUDA reports it (nvidia-smi), since the
# datasheets' "80GB" / "141GB" are rounded. Bandwidths in bytes/s.
TPU_V4 = Chip("v4", "tpu", 32 * GiB, 275e12, 1200e9, ("TPU v4",))
TPU_V5E = Chip("v5e", "tpu", 16 * GiB, 197e12, 819e9, ("TPU v5 lite", "TPU v5e"))
TPU_V5P = Chip("v5p", "tpu", 95 * GiB, 459e12, 2765e9, ("TPU v5", "TPU v5p"))
TPU_V6E = Chip("v6e", "tpu", 32 * GiB, 918e12, 1640e9, ("TPU v6 lite", "TPU v6e"))
A100 = Chip("a100", "gpu", 81920 * MiB, 312e12, 2039e9, ("NVIDIA A100-SXM4-80GB",))
H100 = Chip("h100", "gpu", 81559 * MiB, 989e12, 3350e9, ("NVIDIA H100 80GB HBM3",))
H200 = Chip("h200", "gpu", 143771 * MiB, 989e12, 4800e9, ("NVIDIA H200",))
# a 24 GB card (GDDR6, 125 TFLOP/s bf16 dense, 600 GB/s): the class of GPU QLoRA of an 8B model is meant for
A10 = Chip("a10", "gpu", 23028 * MiB, 125e12, 600e9, ("NVIDIA A10",))
CHIPS = {chip.name: chip for chip in (TPU_V4, TPU_V5E, TPU_V5P, TPU_V6E, A100, H100, H200, A10)}

TPU_SLICES = {s.name: s for s in (
    TpuSlice("v4-8", TPU_V4, "v4:2x2x1", 4, (2, 2, 1), chip_config="megacore"),
    TpuSlice("v5e-1", TPU_V5E, "v5e:1x1", 1, (1, 1, 1)),
    TpuSlice("v5e-4", TPU_V5E, "v5e:2x2", 4, (2, 2, 1)),
    TpuSlice("v5e-8", TPU_V5E, "v5e:2x4", 8, (2, 4, 1)),
    TpuSlice("v5e-16", TPU_V5E, "v5e:4x4", 16, (2, 2, 1)),
    TpuSlice("v5p-8", TPU_V5P, "v5p:2x2x1", 4, (2, 2, 1)),
    TpuSlice("v5p-128", TPU_V5P, "v5p:4x4x4", 64, (2, 2, 1)),
    TpuSlice("v6e-1", TPU_V6E, "v6e:1x1", 1, (1, 1, 1)),
    TpuSlice("v6e-8", TPU_V6E, "v6e:2x4", 8, (2, 4, 1)),
    TpuSlice("v6e-256", TPU_V6E, "v6e:16x16", 256, (2, 2, 1)),
)}
GPU_TARGETS = {g.name: g for g in (GpuTarget("a100", A100, "8.0"), GpuTarget("h100", H100, "9.0"),
                                   GpuTarget("h200", H200, "9.0"))}


def target_names() -> tuple[str, ...]:
    return tuple(TPU_SLICES) + tuple(GPU_TARGETS)


def lookup_target(name: str) -> TpuSlice | GpuTarget:
    """The target called ``name`` (case-insensitive); a one-line ConfigError naming the choices otherwise."""
    key = str(name).strip().lower()
    found = TPU_SLICES.get(key) or GPU_TARGETS.get(key)
    if found is None:
        raise ConfigError(f"unknown target {name!r}: choose one of {', '.join(target_names())}")
    return found


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The chip whose devices report ``device_kind`` (exactly, else a GPU kind naming the chip, such as
    "NVIDIA H100 PCIe"), or None."""
    for chip in CHIPS.values():
        if device_kind in chip.device_kinds:
            return chip
    words = device_kind.lower().replace("-", " ").split()
    for chip in CHIPS.values():
        if chip.platform == "gpu" and chip.name in words:
            return chip
    return None


def libtpu_install_hint() -> str:
    import jax

    return f'pip install "jax[tpu]=={jax.__version__}" (or scripts/accel_env.sh)'


def tpu_topology_devices(target: str) -> list:
    """Compile-only devices of the TPU slice ``target``: build a mesh of them and ``.lower(...).compile()``.

    One-line ConfigErrors for an unknown or non-TPU target and for a machine without libtpu.
    """
    found = lookup_target(target)
    if not isinstance(found, TpuSlice):
        raise ConfigError(f"target {target!r} is a GPU; TPU topologies are: {', '.join(TPU_SLICES)}")
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"target {found.name!r} needs libtpu to compile for TPU, and it is not installed: "
                          f"{libtpu_install_hint()}")
    from jax.experimental import topologies

    try:
        devices = list(topologies.get_topology_desc(**found.topology_kwargs()).devices)
    except Exception as error:  # libtpu refusing the topology: a mismatched libtpu/jax pair
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"libtpu could not describe {found.name} ({found.topology}): {first_line}; "
                          f"install the libtpu of this jax: {libtpu_install_hint()}") from error
    if len(devices) != found.num_chips:
        raise ConfigError(f"libtpu describes {found.name} ({found.topology}) with {len(devices)} devices, expected "
                          f"{found.num_chips}; install the libtpu of this jax: {libtpu_install_hint()}")
    return devices


def gpu_abstract_device(target: str):
    """The ``jax.sharding.AbstractDevice`` of GPU ``target``, under which (in an abstract mesh) jax lowers
    Pallas-Triton kernels for that GPU without one being present."""
    found = lookup_target(target)
    if not isinstance(found, GpuTarget):
        raise ConfigError(f"target {target!r} is a TPU slice; GPU targets are: {', '.join(GPU_TARGETS)}")
    from jax.sharding import AbstractDevice

    return AbstractDevice(device_kind=found.device_kind, num_cores=None, platform="gpu")
