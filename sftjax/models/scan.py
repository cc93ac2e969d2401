"""Scan over layers: the decoder's layers stored stacked and run by one ``lax.scan``.

Why: a model of N identical layers unrolled in the jitted step is N copies of the layer in the HLO, so compile
time grows with depth (minutes for 32+ layers on TPU/GPU). Scanned, the layer is traced and compiled once.

How, in plain words:

* A model is built, loaded, adapted (LoRA) and exported with one module per layer (``model.layers[i]``); that is
  the layout every weight map, the PEFT/GGUF exporters and generation know. :func:`stack_layers` turns that
  into the scanned layout for training: layers of identical structure are grouped and every variable of a group
  is stacked along a new leading axis (logical axis ``"layers"``, never sharded). :func:`unstacked` gives the
  per-layer layout back (a new module; the stacked one is untouched) for export and generation.
* Layers are "identical" when their graph definitions are equal: same shapes, same adapters, same static
  settings such as the sliding window. Families whose layers alternate (Gemma 2: sliding, global, sliding, ...)
  scan over a *period* of layers: the scanned body runs layers ``j = 0..p-1`` of one period, and the scan
  repeats it ``N / p`` times. Layers that follow no short period are split into runs of consecutive identical
  layers, each run its own scan. The grouping is a :class:`ScanBlock` tuple kept on the model (``scan_plan``).
* Stacked variables keep their type and metadata (``nnx.Param``, ``nnx.LoRAParam``, RNG streams of LoRA
  dropout), so the trainable filter, optimizer masks and sharding rules apply unchanged; their ``logical_axes``
  gain ``"layers"`` in front. LoRA dropout streams get one key per stacked layer (``nnx.reseed`` with
  ``policy="match_shape"``), so dropout masks differ between scanned and unscanned runs; everything else is the
  same computation, and tests compare the two layouts' logits and gradients.
* Remat applies to the scanned body (one period of layers), like ``nnx.remat`` per layer when unscanned.
* Element-wise optimizers (AdamW, SGD) update a stacked array exactly as its layers one by one. Adafactor
  factors a weight's two largest dimensions, which for a stack is still the layer's own two unless the number of
  stacked layers exceeds one of them (e.g. LoRA's rank): then its second-moment statistics span layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from sftjax.errors import ConfigError

from sftjax.models.moe import MoEAux

LAYERS_AXIS = "layers"
MAX_PERIOD = 8


@dataclasses.dataclass(frozen=True)
class ScanBlock:
    """Layers ``start + r * period + j`` for r < repeats, j < period: one ``lax.scan`` of ``repeats`` steps."""

    start: int
    period: int
    repeats: int

    def layer_index(self, repeat: int, offset: int) -> int:
        return self.start + repeat * self.period + offset

    @property
    def stop(self) -> int:
        return self.start + self.period * self.repeats


def is_scanned(model) -> bool:
    return getattr(model, "scan_plan", None) is not None


def plan_scan(layers) -> tuple[ScanBlock, ...]:
    """Group ``layers`` for scanning: one periodic block if a period <= MAX_PERIOD fits, else runs of equal layers."""
    graphdefs = [nnx.graphdef(layer) for layer in layers]
    count = len(graphdefs)
    for period in range(1, min(MAX_PERIOD, count // 2) + 1):  # a period must repeat to be worth a scan
        if count % period == 0 and all(graphdefs[i] == graphdefs[i % period] for i in range(count)):
            return (ScanBlock(0, period, count // period),)
    blocks, start = [], 0
    for index in range(1, count + 1):
        if index == count or graphdefs[index] != graphdefs[start]:
            blocks.append(ScanBlock(start, 1, index - start))
            start = index
    return tuple(blocks)


def _logical_axes(variable, ndim: int) -> tuple:
    axes = variable.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * ndim


def _stack_values(values: list, logical_axes: tuple):
    """``jnp.stack(values)``, created directly in its sharding by the rules when the values live on a mesh (so a
    big model never holds a replicated stack on one device)."""
    sharding = getattr(values[0], "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return jnp.stack(values)
    from sftjax.sharding import partition_spec

    shape = (len(values),) + tuple(values[0].shape)
    target = NamedSharding(sharding.mesh, partition_spec(logical_axes, shape, sharding.mesh))
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=target)(*values)


def _stack_modules(modules: list) -> nnx.Module:
    """One module whose every variable is the stack of the modules' variables (which are released)."""
    graphdef = nnx.graphdef(modules[0])
    flats = [dict(nnx.to_flat_state(nnx.state(m))) for m in modules]
    stacked = {}
    for path, first in flats[0].items():
        variables = [flat[path] for flat in flats]
        axes = (LAYERS_AXIS,) + _logical_axes(first, first.get_value().ndim)
        value = _stack_values([v.get_value() for v in variables], axes)
        stacked[path] = first.replace(value, logical_axes=axes)
        for variable in variables:  # drop the per-layer copies now: peak memory is one variable group, not 2x
            variable.set_value(jnp.zeros((0,), value.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def _slice_module(stacked: nnx.Module, index: int) -> nnx.Module:
    graphdef = nnx.graphdef(stacked)
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(stacked)):
        axes = variable.get_metadata().get("logical_axes")
        if axes is not None and (not axes or axes[0] != LAYERS_AXIS):
            raise ValueError(f"scan: variable {'/'.join(map(str, path))} is not stacked (logical_axes {axes})")
        flat[path] = variable.replace(variable.get_value()[index], logical_axes=tuple(axes[1:]) if axes else None)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def stack_layers(model, plan: tuple[ScanBlock, ...] | None = None):
    """Convert ``model`` (a Decoder, per-layer layout) in place to the scanned layout; returns the model.

    The per-layer modules are consumed (their arrays are released as each group is stacked). Apply LoRA first.
    """
    if is_scanned(model):
        return model
    config = model.config
    if config.per_layer_input_size or config.kv_shared_layers:
        what = "per-layer inputs" if config.per_layer_input_size else "key/value sharing across layers"
        raise ConfigError(f"model.scan_layers: {config.architecture} with {what} (Gemma 4 E2B/E4B) runs one module "
                          "per layer; set model.scan_layers: false")
    layers = list(model.layers)
    plan = plan or plan_scan(layers)
    blocks = []
    for block in plan:
        group = [_stack_modules([layers[block.layer_index(r, j)] for r in range(block.repeats)])
                 for j in range(block.period)]
        blocks.append(nnx.List(group))
    model.layers = nnx.List(blocks)
    model.scan_plan = tuple(plan)
    return model


def unstacked(model):
    """The per-layer layout of ``model`` as a new module sharing no mutable state with it (itself if unscanned)."""
    if not is_scanned(model):
        return model
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    layers = {}
    for block, group in zip(copy.scan_plan, copy.layers):
        for offset, stacked in enumerate(group):
            for repeat in range(block.repeats):
                layers[block.layer_index(repeat, offset)] = _slice_module(stacked, repeat)
    copy.layers = nnx.List([layers[i] for i in range(len(layers))])
    copy.scan_plan = None
    return copy


def unstacked_paths(plan: tuple[ScanBlock, ...] | None, path: tuple) -> list[tuple]:
    """The per-layer paths that a (possibly stacked) state path stands for: ``layers/b/j/...`` -> ``layers/i/...``."""
    if plan is None or len(path) < 3 or str(path[0]) != "layers":
        return [tuple(path)]
    block = plan[int(path[1])]
    offset = int(path[2])
    return [("layers", block.layer_index(r, offset), *path[3:]) for r in range(block.repeats)]


def run_scanned(model, x_BLD, cos_BLR, sin_BLR, segment_ids_BL, deterministic: bool, policy=None, remat=False):
    """Apply the scanned layers of ``model`` to ``x_BLD``: one ``lax.scan`` per block, body = one period.
    Returns (x, the layers' MoEAux summed, carried through the scans; None for a dense model). Dense and MoE
    layers have different graphs, so a mixed model scans them as separate blocks or as a period of both."""
    experts = model.config.moe.num_experts if model.config.moe is not None else 0
    aux = MoEAux.zeros(experts) if experts else None
    for block_modules in model.layers:
        graphdef, state = nnx.split(block_modules)

        def body(carry, period_state, graphdef=graphdef):
            x, total = carry
            group = nnx.merge(graphdef, period_state)
            for layer in group:
                x, layer_aux = layer(x, cos_BLR, sin_BLR, segment_ids_BL, deterministic)
                total = total if layer_aux is None else total + layer_aux
            return (x, total), None

        if remat:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        (x_BLD, aux), _ = jax.lax.scan(body, (x_BLD, aux), state)
    return x_BLD, aux
