"""The estimate of ``sftjax plan``: memory per device and step time of a run, from shapes and formulas only.

What it does, in plain words: the model is built *abstractly* (``nnx.eval_shape``: shapes and dtypes, no
weights; a ``model.path`` contributes only its ``config.json`` or GGUF metadata, never a weight file), LoRA is
added and the layers stacked the way the trainer does it, and ``split_model`` says what trains. Every array then
gets the per-device shard shape the real sharding rules give it (``sftjax.sharding.partition_spec`` on an
abstract mesh of the planned size), so parameter, gradient and optimizer bytes are what the trainer allocates;
the optimizer state comes from running the real optax ``init`` under ``jax.eval_shape``.

Activation memory is a formula, not a measurement. Per micro-batch and device, with T = tokens per device
(micro-batch rows / (data*fsdp) x max_length), b = bytes of the compute dtype, D = hidden size, and Q, K, F the
query width (heads x head_dim), key/value width and MLP width *per device* (divided by ``tensor`` where it
divides the heads / MLP, as the rules do), one decoder layer keeps for its backward pass, per token:

* ``remat: none``      everything the backward needs: 2D(4 + b) for the two RMSNorms (float32 normalized input
                       and output), b x (2D + 2Q + 2K + 6F) for the residual sums, q, k, v, the attention
                       output, and the MLP (gate, up, three silu intermediates, gate*up), plus 4 x heads (the
                       float32 attention log-sum-exp), for every layer;
* ``remat: full``      only the layer input, b x D per layer, plus the ``none`` set of one layer while it is
                       recomputed in the backward pass;
* ``remat: save_dots`` the layer input and every matmul output (q, k, v, o, gate, up, down):
                       b x (3D + Q + 2K + 2F) per layer, plus one layer's ``none`` set during the backward;
* ``remat: offload_dots`` like ``full`` on the device; the ``save_dots`` set goes to host memory
                       (reported apart, it does not count against HBM).

These are what JAX itself saves for the backward pass (``jax.ad_checkpoint``'s saved residuals, which the tests
compare with); XLA's fusions may keep less. LoRA adds per adapted linear layer and token b x r (the ``x @ A``
product), (b + 1) x in_features with dropout > 0 (the dropped input and its mask), and b x (r + out_features)
under ``save_dots`` (both adapter matmul outputs). Outside the layers: the embedding output (b x D) and the
final norm ((4 + b) x D) per token, the attention kernel's working set (the dense ``reference`` keeps float32
scores and probabilities [rows, heads, L, L] per layer; blockwise kernels a few tiles) and the fused
cross-entropy's (its float32 input gradient T x D, the head weight's gradient [D, V] in the compute dtype and
the gathered head under fsdp, and float32 logit tiles: [T, V] for the ``reference`` implementation,
[256, 4096] for ``xla_chunked``, [256, V] for the Pallas ones). Transients added on top: the float32 gradient
accumulator and one micro-batch's gradient in the parameter dtype, a compute-dtype copy of all weights when it
differs from the parameter dtype, and two layers' weights gathered whole when ``fsdp`` > 1. XLA's own scratch,
fragmentation and fusion choices are not modelled: the verdict is an estimate; ``--compile`` puts XLA's
numbers for the current backend next to it.

Throughput: tokens per step = global_batch_size x max_length, model FLOPs per token from
``sftjax.train.flops.model_flops_per_token``, step time = tokens x FLOPs / (devices x peak x MFU).

Mixture-of-experts models: ``active`` parameters are those one token uses (the base parameters minus, per MoE
layer, the E - k experts it does not visit); the FLOPs use them. The expert weights per device are the stacked
``experts`` arrays (with their adapters) as the rules shard them: E / fsdp experts per device, kept whole. The
MLP activations of an MoE layer are those of k experts of its expert width (plus a shared expert).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.attention import api as attention_api
from pallas_kernels.cross_entropy import api as cross_entropy_api
from sftjax import accelerators
from sftjax.config import Config
from sftjax.errors import ConfigError
from sftjax.models.tokenizer import load_tokenizer
from sftjax.models.quant import QuantizedKernel, QuantizedWeight
from sftjax.models.scan import unstacked_paths
from sftjax.peft.lora import linear_modules
from sftjax.sharding import MESH_AXES
from sftjax.train.flops import (calibrated_cpu_flops, device_peak_flops, inactive_expert_params,
                                model_flops_per_token)
from sftjax.train.program import build_program

GiB = 1024 ** 3
# --device names: the chips of sftjax.accelerators (also spelled tpu-v5p etc.), and cpu
DEVICE_KINDS = (*accelerators.CHIPS, *(f"tpu-{c.name}" for c in accelerators.CHIPS.values() if c.platform == "tpu"),
                "cpu")
JAX_GPU_MEMORY_FRACTION = 0.75  # jax preallocates this share of GPU memory unless told otherwise
CE_BLOCK_T, CE_BLOCK_V = 256, 4096


@dataclasses.dataclass
class DeviceSpec:
    """One accelerator as the plan sees it."""

    name: str
    memory_bytes: int  # per device
    usable_fraction: float  # of memory_bytes that the program may use
    peak_flops: float | None
    note: str = ""

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_bytes * self.usable_fraction)


@dataclasses.dataclass
class Plan:
    """The estimate for one config on ``devices`` devices of kind ``device.name``; all bytes are per device."""

    device: DeviceSpec
    devices: int
    mesh: dict
    architecture: str
    params_base: int  # the model's own parameters
    params_total: int  # plus LoRA adapters
    params_trainable: int
    memory: list  # (item, bytes, note) on the device
    params_active: int  # base parameters one token uses (= params_base for a dense model)
    expert_bytes: int  # MoE: the stacked expert weights (and their adapters) per device; 0 for a dense model
    experts_per_device: int  # MoE: experts each device holds; 0 for a dense model
    host_bytes: int  # offloaded activations (remat offload_dots)
    tokens_per_device_micro: int
    tokens_per_step: int
    flops_per_token: float
    mfu: float
    step_time_s: float | None
    steps: int | None
    run_time_s: float | None
    notes: list
    compiled: dict | None = None

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b, _ in self.memory)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device.budget_bytes

    def largest(self, count: int = 3) -> list:
        return sorted(self.memory, key=lambda item: -item[1])[:count]

    def to_dict(self) -> dict:
        return {
            "estimate": True,
            "device": dataclasses.asdict(self.device) | {"budget_bytes": self.device.budget_bytes},
            "devices": self.devices, "mesh": self.mesh, "architecture": self.architecture,
            "params": {"base": self.params_base, "total": self.params_total, "trainable": self.params_trainable,
                       "active": self.params_active},
            "experts": {"weights_bytes_per_device": self.expert_bytes, "per_device": self.experts_per_device},
            "memory_per_device": {name: nbytes for name, nbytes, _ in self.memory},
            "memory_notes": {name: note for name, _, note in self.memory if note},
            "total_bytes_per_device": self.total_bytes, "host_bytes_per_device": self.host_bytes,
            "fits": self.fits, "verdict": "FITS" if self.fits else "DOES NOT FIT",
            "largest": [name for name, _, _ in self.largest()],
            "throughput": {"tokens_per_step": self.tokens_per_step,
                           "tokens_per_device_micro_batch": self.tokens_per_device_micro,
                           "model_flops_per_token": self.flops_per_token, "mfu": self.mfu,
                           "step_time_s": self.step_time_s, "steps": self.steps, "run_time_s": self.run_time_s},
            "compiled": self.compiled,
            "notes": self.notes,
        }

    def format(self) -> str:
        """A readable table."""
        d = self.device
        mesh = " ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        share = 100 * self.params_trainable / max(self.params_total, 1)
        lines = [(f"sftjax plan (an ESTIMATE, not a measurement): {self.architecture} on {self.devices} x "
                  f"{d.name} (mesh {mesh})"),
                 (f"parameters: {_count(self.params_base)} base, {_count(self.params_total)} with adapters, "
                  f"{_count(self.params_trainable)} trainable ({share:.2f}%)")]
        if self.experts_per_device:
            lines.append(f"mixture of experts: {_count(self.params_active)} active per token; {self.experts_per_device} "
                         f"experts per device, their weights {_size(self.expert_bytes)} per device")
        lines += ["", "memory per device"]
        for name, nbytes, note in self.memory:
            lines.append(f"  {name:<40}{_size(nbytes):>12}  {note}")
        lines.append(f"  {'total':<40}{_size(self.total_bytes):>12}")
        if self.host_bytes:
            lines.append(f"  {'offloaded to host memory':<40}{_size(self.host_bytes):>12}")
        budget = f"{_size(d.budget_bytes)} usable of {_size(d.memory_bytes)}"
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        if self.fits and self.total_bytes > 0.9 * d.budget_bytes:
            verdict += " (under 10% headroom: tight for an estimate)"
        largest = ", ".join(f"{name} {_size(nbytes)}" for name, nbytes, _ in self.largest())
        note = f"; {d.note}" if d.note else ""
        lines += ["", f"verdict: {verdict} ({_size(self.total_bytes)} estimated vs {budget}{note})",
                  f"largest: {largest}", "",
                  (f"tokens per step: {self.tokens_per_step:,} ({self.tokens_per_device_micro:,} per device per "
                   f"micro-batch); model FLOPs per token: {self.flops_per_token:.4g}")]
        if self.step_time_s is None:
            lines.append("step time: unknown (no peak FLOP/s for this device)")
        else:
            lines.append(f"step time at MFU {self.mfu:.0%}: {_duration(self.step_time_s)}")
        if self.steps is None:
            lines.append("steps: depend on the dataset size (train.epochs); run time not estimated")
        elif self.run_time_s is not None:
            lines.append(f"run: {self.steps:,} steps, about {_duration(self.run_time_s)}")
        if self.compiled and "backend" in self.compiled:
            where = f"{self.compiled['backend']}, {self.compiled['devices']} devices, per device"
            lines += ["", f"XLA memory analysis of the compiled train step ({where}):"]
            for key, value in self.compiled.items():
                if key.endswith("_bytes"):
                    lines.append(f"  {key:<40}{_size(value):>12}")
        lines += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    if nbytes >= GiB:
        return f"{nbytes / GiB:.2f} GiB"
    if nbytes >= 1024 ** 2:
        return f"{nbytes / 1024 ** 2:.1f} MiB"
    return f"{nbytes / 1024:.1f} KiB"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------------ devices

def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gpu_usable_fraction() -> tuple[float, str]:
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() == "false":
        return 1.0, "jax allocates on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false)"
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_GPU_MEMORY_FRACTION))
    return fraction, (f"jax preallocates {fraction:.0%} of GPU memory; raise it with "
                      "XLA_PYTHON_CLIENT_MEM_FRACTION=.95")


def device_spec(kind: str | None, devices: int) -> DeviceSpec:
    """The spec of ``kind`` (one of DEVICE_KINDS), or of this machine's devices when None."""
    if kind is None:
        device = jax.devices()[0]
        if device.platform == "cpu":
            kind = "cpu"
        else:
            chip = accelerators.chip_for_device_kind(device.device_kind)
            if chip is None:  # an accelerator the table does not know: ask the runtime
                stats = device.memory_stats() or {}
                fraction, note = (1.0, "") if device.platform != "gpu" else _gpu_usable_fraction()
                return DeviceSpec(device.device_kind, int(stats.get("bytes_limit", 0)) or 1, fraction,
                                  device_peak_flops(device), note)
            kind = chip.name
    if kind not in DEVICE_KINDS:
        raise ConfigError(f"--device {kind!r} is not known; choose one of {', '.join(DEVICE_KINDS)}")
    if kind == "cpu":
        # (fake) CPU devices share the host's cores and RAM: each gets its share of both
        peak = calibrated_cpu_flops() / max(devices, 1) if jax.default_backend() == "cpu" else None
        return DeviceSpec("cpu", _host_memory_bytes() // max(devices, 1), 1.0, peak,
                          "CPU devices share the host's RAM and cores; FLOP/s calibrated on this CPU (cached)")
    chip = accelerators.CHIPS[kind.removeprefix("tpu-")]
    fraction, note = _gpu_usable_fraction() if chip.platform == "gpu" else (1.0, "")
    name = chip.name if chip.platform == "gpu" else f"tpu-{chip.name}"
    return DeviceSpec(name, chip.hbm_bytes, fraction, chip.peak_bf16_flops, note)


# ------------------------------------------------------------------------------------------------ model

def abstract_mesh(mesh_sizes: dict):
    """A mesh of the planned sizes without devices: shardings and shard shapes, nothing to run on."""
    return jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in MESH_AXES), MESH_AXES)


def _itemsize(dtype) -> int:
    try:
        return jnp.dtype(dtype).itemsize
    except TypeError:  # extended dtypes (PRNG keys): two uint32 words
        return 8


def shard_shape(shape, spec, mesh_sizes: dict) -> tuple[int, ...]:
    """The per-device shape of an array of ``shape`` laid out by PartitionSpec ``spec``."""
    out = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        out.append(size // math.prod(mesh_sizes[a] for a in axes))
    return tuple(out)


def _variable_specs(state) -> list[tuple[tuple, jax.ShapeDtypeStruct, object]]:
    """(path, abstract value, PartitionSpec) per variable of an abstract, placed nnx.State."""
    return [(tuple(path), variable.get_value(), variable.get_value().sharding.spec)
            for path, variable in nnx.to_flat_state(state)]


def _bytes(entries, mesh_sizes, dtype=None) -> int:
    return sum(math.prod(shard_shape(v.shape, spec, mesh_sizes)) * _itemsize(dtype or v.dtype)
               for _, v, spec in entries)


def _leaf_specs(tree) -> list[tuple[tuple, jax.ShapeDtypeStruct, object]]:
    """(path, abstract leaf, PartitionSpec) per leaf of an abstract, placed pytree (the optimizer state)."""
    return [((), leaf, leaf.sharding.spec) for leaf in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------------ activations

def _split(size: int, ways: int) -> int:
    return size // ways if ways > 1 and size % ways == 0 else size


def activation_items(cfg: Config, mc, mesh_sizes: dict, tokens: int, lora_linears: list) -> tuple[list, int]:
    """(memory items, host bytes) of one micro-batch's activations per device; see the module docstring."""
    b = _itemsize(cfg.model.compute_dtype)
    tensor = mesh_sizes["tensor"]
    heads_split = tensor if mc.num_heads % tensor == 0 and mc.num_kv_heads % tensor == 0 else 1
    d = mc.hidden_size
    q = mc.num_heads * mc.head_dim // heads_split
    k = mc.num_kv_heads * mc.head_dim // heads_split
    heads = mc.num_heads // heads_split
    n = mc.num_layers
    remat = cfg.model.remat
    # the MLP width whose activations a layer keeps: k experts of the expert width (+ shared) in an MoE layer
    moe_layers = len(mc.moe_layers)
    f_dense = _split(mc.intermediate_size, tensor)
    if moe_layers:
        moe = mc.moe
        f_moe = moe.num_experts_per_tok * _split(moe.expert_intermediate_size, tensor)
        f_moe += _split(moe.shared_expert_intermediate_size, tensor)
        f = (f_dense * (n - moe_layers) + f_moe * moe_layers) // n  # the layers' mean width
    else:
        f = f_dense

    lora_none = lora_dots = 0  # bytes per token, all layers
    for in_features, out_features, layers in lora_linears:
        dropped = (b + 1) * in_features if cfg.lora.dropout > 0 else 0  # dropped input and its boolean mask
        lora_none += layers * (b * cfg.lora.r + dropped)
        lora_dots += layers * b * (cfg.lora.r + out_features)
    lora_none, lora_dots = lora_none // n, lora_dots // n  # per layer
    norms = 2 * d * (4 + b)  # two RMSNorms: float32 normalized input and the output
    per_layer_none = norms + b * (2 * d + 2 * q + 2 * k + 6 * f) + 4 * heads + lora_none
    per_layer_dots = b * (3 * d + q + 2 * k + 2 * f) + lora_dots
    saved_name, recompute_name = "activations saved for backward", "activations of one layer (recompute)"
    items, host = [], 0
    if remat == "none":
        items.append((saved_name, n * tokens * per_layer_none,
                      f"remat none: {per_layer_none} B/token/layer x {n} layers x {tokens} tokens"))
    elif remat in ("full", "offload_dots"):
        items.append((saved_name, n * tokens * b * d, f"remat {remat}: the layer inputs, {b * d} B/token/layer"))
        items.append((recompute_name, tokens * per_layer_none, "backward of one layer"))
        if remat == "offload_dots":
            host = n * tokens * per_layer_dots
    else:  # save_dots
        items.append((saved_name, n * tokens * per_layer_dots,
                      f"remat save_dots: layer input and matmul outputs, {per_layer_dots} B/token/layer"))
        items.append((recompute_name, tokens * per_layer_none, "backward of one layer"))
    items.append(("activations outside the layers", tokens * (b * d + (4 + b) * d), "embeddings, final norm"))
    return items, host


def cross_entropy_items(cfg: Config, mc, tokens_device: int, tokens_global: int, fsdp: int, device_name: str) -> list:
    """The fused loss's working set per device (see the module docstring)."""
    b = _itemsize(cfg.model.compute_dtype)
    vocab, d = mc.vocab_size, mc.hidden_size
    backend = _backend_of(device_name)
    name = cfg.model.cross_entropy or cross_entropy_api.automatic_implementation(backend, tokens_global * vocab)[0]
    if name == "reference":
        tile, what = tokens_device * vocab, "[T, V] logits"
    elif name == "xla_chunked":
        tile, what = CE_BLOCK_T * min(CE_BLOCK_V, vocab), f"[{CE_BLOCK_T}, {min(CE_BLOCK_V, vocab)}] tiles"
    else:
        tile, what = CE_BLOCK_T * vocab, f"[{CE_BLOCK_T}, V] row blocks"
    gathered = fsdp > 1  # the head weight is gathered whole (fsdp) before the loss; else it is the param itself
    working = 3 * 4 * tile + 4 * tokens_device * d + (2 if gathered else 1) * b * d * vocab
    head = "head weight gathered and its gradient" if gathered else "head weight gradient"
    return [("cross-entropy working set", working, f"{name}: float32 {what} x3, d_hidden, {head} [D, V]")]


def _backend_of(device_name: str) -> str:
    """The backend a device kind of the tables runs ('cpu', 'gpu' or 'tpu'), for the kernels' automatic choice."""
    if device_name == "cpu":
        return "cpu"
    return "tpu" if device_name.startswith("tpu") else "gpu"


def attention_items(cfg: Config, mc, mesh_sizes: dict, rows: int, length: int, device_name: str) -> list:
    """The attention kernel's working set per device: the dense ``reference`` keeps float32 scores, their exp
    and the probabilities, and a boolean mask [rows, heads, L, L] (for every layer without remat, else for the layer being recomputed);
    ``xla_chunked`` about three float32 [rows, heads, block, block] tiles; the Pallas/splash/cuDNN kernels O(L)."""
    tensor = mesh_sizes["tensor"]
    heads = mc.num_heads // tensor if mc.num_heads % tensor == 0 and mc.num_kv_heads % tensor == 0 else mc.num_heads
    name = cfg.model.attention or attention_api.automatic_implementation(_backend_of(device_name), length)[0]
    if name == "reference":
        layers = mc.num_layers if cfg.model.remat == "none" else 1
        return [("attention working set", layers * rows * heads * length * length * 13,
                 f"reference: float32 scores, exp, probabilities, mask [rows, heads, L, L] x {layers} layer(s)")]
    if name == "xla_chunked":
        block = min(length, 128 if device_name == "cpu" else 512)
        return [("attention working set", 3 * rows * heads * block * block * 4,
                 f"xla_chunked: float32 [rows, heads, {block}, {block}] tiles")]
    return [("attention working set", 0, f"{name}: O(L), not modelled")]


def _vocab_size_from_tokenizer(cfg: Config) -> int | None:
    """A random-init model without vocab_size takes it from the run's tokenizer (as training does)."""
    if cfg.model.init is None or "vocab_size" in cfg.model.init:
        return None
    if not (cfg.tokenizer.path or cfg.model.path):
        raise ConfigError("model.init has no vocab_size and there is no tokenizer.path to take it from")
    return len(load_tokenizer(cfg.tokenizer.path or cfg.model.path))


def _lora_linears(model, mesh_sizes) -> list[tuple[int, int, int]]:
    """(in, out features per device, number of layers it stands for) of every adapted linear layer."""
    tensor = mesh_sizes["tensor"]
    out = []
    for module in linear_modules(model).values():
        if getattr(module, "lora_a", None) is None:
            continue
        # [in, out], or [layers, in, out] when stacked for scanning (from the adapter: the kernel may be quantized);
        # an expert projection has an [expert] axis in front of (in, out): a token runs k of its experts
        a_shape, b_shape = module.lora_a.get_value().shape, module.lora_b.get_value().shape
        axes = tuple(module.logical_axes)
        if axes[0] == "expert":  # an expert's A is stored [r, in]
            a_shape = (*a_shape[:-2], a_shape[-1], a_shape[-2])
        shape = (*a_shape[:-1], b_shape[-1])
        per_token = 1
        if axes[0] == "expert":
            axes, shape = axes[1:], shape[:-3] + shape[-2:]
            per_token = model_top_k(model)
        in_axis, out_axis = axes
        in_f = _split(shape[-2], tensor) if in_axis in ("heads", "mlp") else shape[-2]
        out_f = _split(shape[-1], tensor) if out_axis in ("heads", "kv_heads", "mlp") else shape[-1]
        out.append((in_f, out_f, (shape[0] if len(shape) == 3 else 1) * per_token))
    return out


def model_top_k(model) -> int:
    """The experts a token runs in ``model``'s MoE layers (its config's ``num_experts_per_tok``)."""
    return int(model.config.moe.num_experts_per_tok)


# ------------------------------------------------------------------------------------------------ the plan

def _max_length(cfg: Config, seq_len: int | None) -> int:
    if seq_len is not None:
        return seq_len
    if cfg.data is None:
        raise ConfigError("data.max_length is unknown: the config has no data section; pass --seq-len N")
    return int(cfg.data.max_length)


def plan(config: Config, *, devices: int | None = None, device_kind: str | None = None, mfu: float = 0.4,
         seq_len: int | None = None) -> Plan:
    """Estimate memory per device and step time of ``config`` on ``devices`` x ``device_kind`` (default: this
    machine's devices). Reads no weights and compiles nothing."""
    cfg = config
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} must be in (0, 1]")
    if devices is None:
        if device_kind is None:
            devices = jax.device_count()
        else:  # the fixed mesh sizes (an axis of -1 takes one device)
            mesh = cfg.train.mesh
            devices = math.prod(v for v in (mesh.data, mesh.fsdp, mesh.tensor) if v != -1)
    if devices < 1:
        raise ConfigError(f"--devices {devices} must be >= 1")
    mesh_sizes = cfg.check_devices(devices)
    device = device_spec(device_kind, devices)
    program = build_program(cfg, mesh=abstract_mesh(mesh_sizes), total_steps=cfg.train.steps or 1000, abstract=True,
                            vocab_size=_vocab_size_from_tokenizer(cfg))
    mc, model, trainable, frozen = program.model_config, program.model, program.trainable, program.frozen
    train_entries = _variable_specs(trainable)
    quantized_paths = {tuple(path) for path, v in nnx.to_flat_state(frozen) if isinstance(v, QuantizedKernel)}
    quantized_entries = [e for e in _variable_specs(frozen) if e[0] in quantized_paths]
    frozen_entries = [e for e in _variable_specs(frozen) if e[0] not in quantized_paths]
    quantized_params = sum(len(unstacked_paths(model.scan_plan, path)) * node.in_features * node.out_features
                           * getattr(node, "num_experts", 1)  # a stack of quantized experts
                           for path, node in nnx.iter_graph(model) if isinstance(node, QuantizedWeight))
    params_total = quantized_params + sum(math.prod(v.shape) for _, v, _ in train_entries + frozen_entries
                                          if jnp.issubdtype(v.dtype, jnp.floating))
    lora_count = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    trainable_count = sum(math.prod(v.shape) for _, v, _ in train_entries)
    opt_entries = _leaf_specs(program.state.opt_state)
    param_dtype = cfg.model.param_dtype
    memory = [
        ("frozen weights", _bytes(frozen_entries, mesh_sizes), f"{param_dtype}, sharded by the rules"),
    ]
    if quantized_entries:
        double = " (double-quantized scales)" if cfg.model.double_quant else ""
        memory.append(("frozen quantized weights", _bytes(quantized_entries, mesh_sizes),
                       f"{cfg.model.quantize} codes + scales{double}, {_count(quantized_params)} params"))
    memory += [
        ("trainable weights", _bytes(train_entries, mesh_sizes), f"{param_dtype} master copy"),
        ("gradient accumulator", _bytes(train_entries, mesh_sizes, jnp.float32), "float32, like the params"),
        ("gradient of one micro-batch", _bytes(train_entries, mesh_sizes), param_dtype),
        ("optimizer state", _bytes(opt_entries, mesh_sizes), f"{cfg.optim.name} (optax init, eval_shape)"),
    ]
    if cfg.model.compute_dtype != param_dtype:
        floating = [e for e in train_entries + frozen_entries if jnp.issubdtype(e[1].dtype, jnp.floating)]
        memory.append(("weights cast to compute dtype", _bytes(floating, mesh_sizes, cfg.model.compute_dtype),
                       f"{cfg.model.compute_dtype} copy for the forward/backward"))
    if mesh_sizes["fsdp"] > 1:
        no_fsdp = dict(mesh_sizes, fsdp=1)
        layer_entries = [e for e in train_entries + frozen_entries if e[0] and str(e[0][0]) == "layers"]
        one_layer = _bytes(layer_entries, no_fsdp, cfg.model.compute_dtype) // mc.num_layers
        one_layer += _bytes([e for e in quantized_entries if str(e[0][0]) == "layers"], no_fsdp) // mc.num_layers
        memory.append(("fsdp-gathered weights (2 layers)", 2 * one_layer, "gathered whole before use"))

    max_length = _max_length(cfg, seq_len)
    row_shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
    micro_rows = cfg.train.micro_rows
    tokens_device = (micro_rows // row_shards) * max_length
    activations, host_bytes = activation_items(cfg, mc, mesh_sizes, tokens_device, _lora_linears(model, mesh_sizes))
    memory += activations
    memory += attention_items(cfg, mc, mesh_sizes, micro_rows // row_shards, max_length, device.name)
    memory += cross_entropy_items(cfg, mc, tokens_device, micro_rows * max_length, mesh_sizes["fsdp"], device.name)
    batch = 5 * 4 * cfg.train.global_batch_size // row_shards * max_length
    memory.append(("batch", batch, "5 int32 [rows, L] arrays"))

    tokens_per_step = cfg.train.global_batch_size * max_length
    params_base = params_total - lora_count
    params_active, expert_bytes, experts_per_device = params_base - inactive_expert_params(mc), 0, 0
    if mc.moe is not None:
        moe = mc.moe
        expert_bytes = _bytes([e for e in train_entries + frozen_entries + quantized_entries
                               if "experts" in map(str, e[0])], mesh_sizes)
        fsdp = mesh_sizes["fsdp"]
        experts_per_device = moe.num_experts // fsdp if moe.num_experts % fsdp == 0 else moe.num_experts
    flops_per_token = model_flops_per_token(mc, num_params=params_total, num_trainable_params=trainable_count,
                                            seq_len=max_length)
    step_time = None
    if device.peak_flops:
        step_time = tokens_per_step * flops_per_token / (devices * device.peak_flops * mfu)
    steps = cfg.train.steps
    run_time = steps * step_time if steps is not None and step_time is not None else None
    notes = [("memory is an estimate from shapes and formulas (see the `sftjax.plan` docstring); XLA scratch, "
              "fragmentation and fusion are not modelled: keep ~10-20% headroom"),
             f"throughput assumes MFU {mfu:.0%} (--mfu); step time = tokens x FLOPs/token / (devices x peak x MFU)"]
    if steps is None:
        notes.append(f"train.steps is not set: the number of steps depends on the dataset size "
                     f"(train.epochs={cfg.train.epochs}); the run time is not estimated")
    return Plan(device=device, devices=devices, mesh=mesh_sizes, architecture=mc.architecture,
                params_base=params_base, params_total=params_total, params_trainable=trainable_count,
                memory=memory, params_active=params_active, expert_bytes=expert_bytes,
                experts_per_device=experts_per_device, host_bytes=host_bytes, tokens_per_device_micro=tokens_device,
                tokens_per_step=tokens_per_step, flops_per_token=flops_per_token, mfu=mfu, step_time_s=step_time,
                steps=steps, run_time_s=run_time, notes=notes)
