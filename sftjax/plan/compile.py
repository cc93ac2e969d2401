"""``sftjax plan --compile [--target NAME]``: XLA's own verdict on the real train step, next to the estimate.

The run is built abstractly by the run recipe (:func:`sftjax.train.program.build_program`: no weight is read, no
data loaded) on a mesh of the config's sizes and its train step is lowered from sharded ShapeDtypeStructs:

* without ``--target``, for this machine's devices, and compiled: ``memory_analysis()`` per device;
* with a TPU slice (``v5p-8``, ``v5e-16``, ...; :mod:`sftjax.accelerators`), over libtpu's compile-only devices of
  that topology, and compiled by XLA's real TPU compiler, Mosaic kernels (splash attention, the Pallas TPU loss,
  each inside ``shard_map``) included: per-device memory (arguments, outputs, temporaries, code) against the
  chip's HBM (FITS / DOES NOT FIT), ``cost_analysis()`` FLOPs and bytes, and a roofline step time. XLA's cost
  analysis counts each loop body once (the scan over layers, the accumulation scan) and nothing inside Mosaic
  kernels, so its numbers are lower bounds; the roofline takes the compute time from the model-FLOPs formula
  (:mod:`sftjax.train.flops`) at the chip's peak and the memory time from XLA's bytes at its bandwidth;
* with a GPU (``h100``, ``h200``, ``a100``), lowered for CUDA under an abstract device of that GPU (Pallas-Triton
  kernels lowered for its compute capability, every trace-time check run) but not compiled: XLA's GPU compiler
  needs a GPU, so there is no memory analysis, and the report says so.

With automatic kernel choices, the target's own automatic rule decides (``pallas_kernels``'s
``automatic_implementation`` for that backend), not this machine's.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
from jax.sharding import AbstractMesh, AxisType

from pallas_kernels.attention import api as attention_api
from pallas_kernels.cross_entropy import api as cross_entropy_api
from pallas_kernels.lowering import triton_kernels
from sftjax import accelerators
from sftjax.config import Config
from sftjax.errors import ConfigError
from sftjax.models.moe_ops import resolve_implementation
from sftjax.plan.estimate import _duration, _max_length, _size, _vocab_size_from_tokenizer
from sftjax.sharding import MESH_AXES, make_mesh
from sftjax.train.flops import model_flops_per_token
from sftjax.train.program import build_program, check_backend, model_config_for

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "host_temp_size_in_bytes")


def _memory(analysis) -> dict:
    out = {}
    for field in MEMORY_FIELDS:
        value = getattr(analysis, field, None)
        if value is not None:
            out[field.replace("_size_in_bytes", "_bytes")] = int(value)
    out["peak_estimate_bytes"] = (out.get("argument_bytes", 0) + out.get("output_bytes", 0)
                                  - out.get("alias_bytes", 0) + out.get("temp_bytes", 0))
    return out


_OUT_OF_HBM = re.compile(r"total memory required for HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available HBM")


def _argument_bytes(arguments) -> int:
    """Bytes per device of the step's arguments (each leaf's shard on its sharding)."""
    total = 0
    for leaf in jax.tree.leaves(arguments):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _refused_for_memory(error: Exception) -> int | None:
    """The temporaries' bytes when XLA's TPU compiler refused the program for not fitting in HBM, else None."""
    match = _OUT_OF_HBM.search(str(error))
    if "RESOURCE_EXHAUSTED" not in str(error) or match is None:
        return None
    return int(float(match[1]) * 1024 ** "_KMGT".index(match[2] or "_"))


def _program(cfg: Config, mesh, *, seq_len):
    return build_program(cfg, mesh=mesh, total_steps=cfg.train.steps or 1000, abstract=True,
                         vocab_size=_vocab_size_from_tokenizer(cfg))


def compile_memory(config: Config, *, seq_len: int | None = None) -> dict:
    """Lower and compile the real train step for this machine's devices from abstract inputs and return XLA's
    ``memory_analysis()`` per device."""
    cfg = config
    mesh_sizes = cfg.check_devices(jax.device_count())
    check_backend(cfg)
    program = _program(cfg, make_mesh(**mesh_sizes), seq_len=seq_len)
    analysis = program.lower(_max_length(cfg, seq_len)).compile().memory_analysis()
    if analysis is None:
        raise ConfigError(f"--compile: the {jax.default_backend()} backend gives no memory analysis")
    return {"backend": jax.default_backend(), "devices": jax.device_count(), "mesh": mesh_sizes, **_memory(analysis)}


def _for_backend(cfg: Config, backend: str, length: int, num_logits: int, *,
                 moe: bool = False) -> tuple[Config, dict]:
    """The config with automatic kernel choices resolved by ``backend``'s rule (not this machine's): attention,
    cross-entropy and, for an MoE model, the grouped matmul (``model.moe.implementation: auto`` is megablox on a
    TPU)."""
    attention = cfg.model.attention or attention_api.automatic_implementation(backend, length)[0]
    cross_entropy = cfg.model.cross_entropy or cross_entropy_api.automatic_implementation(backend, num_logits)[0]
    model = dataclasses.replace(cfg.model, attention_implementation=attention,
                                cross_entropy_implementation=cross_entropy)
    kernels = {"attention": attention, "cross_entropy": cross_entropy}
    if moe:
        grouped = resolve_implementation(cfg.model.moe.get("implementation", "auto"), backend)
        model = dataclasses.replace(model, moe={**cfg.model.moe, "implementation": grouped})
        kernels["moe"] = grouped
    return cfg.replace(model=model), kernels


def _target_mesh_sizes(cfg: Config, target, chips: int) -> dict:
    try:
        return cfg.check_devices(chips)
    except ConfigError as error:
        raise ConfigError(f"--target {target.name} has {chips} devices: {error}") from None


def compile_for_target(config: Config, target_name: str, *, seq_len: int | None = None) -> dict:
    """The train step of ``config`` compiled for TPU slice ``target_name`` or lowered for GPU ``target_name``
    (see the module docstring); a dict of what was checked and what XLA reports."""
    cfg = config
    target = accelerators.lookup_target(target_name)
    length = _max_length(cfg, seq_len)
    if isinstance(target, accelerators.TpuSlice):
        devices = accelerators.tpu_topology_devices(target.name)
        mesh_sizes = _target_mesh_sizes(cfg, target, len(devices))
        mesh = make_mesh(**mesh_sizes, devices=devices)
        backend = "tpu"
    else:
        mesh_sizes = _target_mesh_sizes(cfg, target, math.prod(v for v in cfg.train.mesh.sizes().values() if v > 0))
        mesh = AbstractMesh(tuple(mesh_sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                            abstract_device=accelerators.gpu_abstract_device(target.name))
        backend = "gpu"
    rows = cfg.train.micro_rows
    model_config = model_config_for(cfg, vocab_size=_vocab_size_from_tokenizer(cfg))
    cfg, kernels = _for_backend(cfg, backend, length, rows * length * model_config.vocab_size,
                                moe=model_config.moe is not None)
    out = {"target": target.name, "chip": target.chip.name, "devices": math.prod(mesh_sizes.values()),
           "mesh": mesh_sizes, "max_length": length, "kernels": kernels}
    if backend == "gpu":
        with jax.sharding.use_abstract_mesh(mesh):
            program = _program(cfg, mesh, seq_len=seq_len)
            lowered = program.train_step.trace(*program.abstract_arguments(length)).lower(
                lowering_platforms=("cuda",))
        text = lowered.as_text()
        kernels_found = triton_kernels(lowered)
        out.update(checked=f"lowered for CUDA (compute capability {target.compute_capability}): every trace-time "
                           f"check of the kernels ran, {len(kernels_found)} Triton kernel(s) in the program",
                   not_checked="not compiled: XLA's GPU compiler needs a GPU, so no memory analysis, no "
                               "register allocation of the fused XLA code, no timing",
                   stablehlo_chars=len(text), triton_kernels=sorted({k.name for k in kernels_found}))
        return out
    program = _program(cfg, mesh, seq_len=seq_len)
    chip = target.chip
    try:
        compiled = program.lower(length).compile()
    except jax.errors.JaxRuntimeError as error:  # the compiler itself refuses a program that cannot fit in HBM
        temp = _refused_for_memory(error)
        if temp is None:
            raise
        arguments = _argument_bytes(program.abstract_arguments(length))
        memory = {"argument_bytes": arguments, "temp_bytes": temp, "peak_estimate_bytes": arguments + temp}
        out.update(checked="refused by XLA's TPU compiler (libtpu): its temporaries alone exceed the chip's HBM, "
                           "so it gives no full memory analysis, cost analysis or code size",
                   memory=memory, hbm_bytes=chip.hbm_bytes, fits=False, verdict="DOES NOT FIT")
        return out
    memory = _memory(compiled.memory_analysis())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    mc = program.model_config
    tokens_per_device = cfg.train.global_batch_size * length / out["devices"]
    model_flops = model_flops_per_token(mc, num_params=program.num_params, num_trainable_params=program.num_trainable,
                                        seq_len=length) * tokens_per_device
    compute_s, memory_s = model_flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bandwidth
    peak = memory["peak_estimate_bytes"]
    out.update(checked="compiled by XLA's TPU compiler (libtpu), Mosaic kernels included",
               memory=memory, hbm_bytes=chip.hbm_bytes, fits=peak <= chip.hbm_bytes,
               verdict="FITS" if peak <= chip.hbm_bytes else "DOES NOT FIT",
               cost={"xla_flops": flops, "xla_bytes_accessed": bytes_accessed, "model_flops": model_flops},
               roofline_step_s=max(compute_s, memory_s), roofline_bound="compute" if compute_s >= memory_s else "memory")
    return out


def format_target(result: dict) -> list[str]:
    """Readable lines for a :func:`compile_for_target` result."""
    mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [f"compiled for {result['target']} ({result['devices']} x {result['chip']}, mesh {mesh}, "
             f"L={result['max_length']}; attention {result['kernels']['attention']}, loss "
             f"{result['kernels']['cross_entropy']}"
             + (f", experts {result['kernels']['moe']}" if "moe" in result["kernels"] else "")
             + f"): {result['checked']}"]
    if "memory" in result:
        for key, value in result["memory"].items():
            lines.append(f"  {key:<40}{_size(value):>12}")
        lines.append(f"verdict from XLA: {result['verdict']} ({_size(result['memory']['peak_estimate_bytes'])} per "
                     f"device vs {_size(result['hbm_bytes'])} HBM)")
        if "cost" not in result:
            return lines
        cost = result["cost"]
        lines.append(f"XLA cost analysis per device: {cost['xla_flops']:.4g} FLOPs, {cost['xla_bytes_accessed']:.4g} "
                     "bytes (each loop body -- the scan over layers, the accumulation -- counted once, and no FLOPs "
                     "inside Mosaic kernels: lower bounds)")
        lines.append(f"roofline step time {_duration(result['roofline_step_s'])} ({result['roofline_bound']} bound: "
                     f"{cost['model_flops']:.4g} model FLOPs per device at the chip's peak, or XLA's bytes at its "
                     "bandwidth)")
    else:
        lines.append(f"  not checked: {result['not_checked']}")
    return lines
