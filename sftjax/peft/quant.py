"""QLoRA at the model level: quantize every attention and MLP linear (and every stack of MoE experts) of a model to
NF4 or int8 (the format is :mod:`sftjax.models.quant`), list what was quantized, and refuse training that would
update a quantized base."""

from __future__ import annotations

import re

from flax import nnx

from sftjax.errors import ConfigError
from sftjax.models.layers import Embed, Linear, RMSNorm
from sftjax.models.moe import ExpertLinear, Router
from sftjax.models.quant import FORMATS, QuantizedKernel, QuantizedWeight


HEAD_NAMES = ("lm_head", "head", "output")


def _owns_weight_matrices(module) -> bool:
    """Whether ``module`` holds a parameter of two or more axes itself (a weight that would stay dense); vectors
    (biases, attention sinks) stay in the param dtype like norms."""
    return any(isinstance(value, nnx.Param) and value[...].ndim >= 2 for value in vars(module).values())


def quantize_model(model, fmt: str, *, double_quant: bool = False) -> dict[str, int]:
    """Quantize, in place, every attention and MLP linear of ``model`` to ``fmt`` (``nf4`` or ``int8``).

    Embeddings, norms and the output head keep their dtype (as bitsandbytes' QLoRA). Stacked MoE experts
    (``ExpertLinear``) are quantized one bitsandbytes tensor per expert; MoE routers (a small ``[embed, expert]``
    matrix that every token's routing depends on; a plain parameter, not a linear layer, in Hugging Face's MoE
    models) and biases keep their dtype too. Returns ``{dotted module path: stored bytes}`` of what was quantized.
    A module that holds weight matrices but is none of these is a one-line ConfigError (vectors such as attention
    sinks stay as they are), as are layers stacked for scanning and layers that already have DoRA (whose magnitude
    must be measured on the quantized weight: enable it after).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"model.quantize={fmt!r} is not one of {', '.join(FORMATS)}, none")
    if double_quant and fmt != "nf4":
        raise ConfigError("double quantization exists for model.quantize=nf4 only")
    if getattr(model, "scan_plan", None) is not None:
        raise ConfigError("quantize_model: the model's layers are already stacked for scanning; quantize before "
                          "sftjax.models.scan.stack_layers")
    chosen: list[tuple[str, Linear]] = []
    for path, node in nnx.iter_graph(model):  # every check before the first layer changes
        if not isinstance(node, nnx.Module) or not path:
            continue
        name = ".".join(str(p) for p in path)
        if isinstance(node, (Embed, RMSNorm, Router)):
            continue
        if isinstance(node, ExpertLinear):
            if node.quantized:
                raise ConfigError(f"quantize_model: {name} is already quantized ({node.kernel.fmt})")
            chosen.append((name, node))
        elif isinstance(node, Linear):
            if str(path[-1]) in HEAD_NAMES:
                continue
            if isinstance(node.kernel, QuantizedWeight):
                raise ConfigError(f"quantize_model: {name} is already quantized ({node.kernel.fmt})")
            if node.lora_magnitude is not None:
                raise ConfigError(f"quantize_model: {name} already has a DoRA adapter; quantize the base first, then "
                                  "enable DoRA (its magnitude is measured on the quantized weight)")
            chosen.append((name, node))
        elif _owns_weight_matrices(node):
            raise ConfigError(f"model.quantize={fmt}: {name} is a {type(node).__name__}, which quantization does not "
                              "support (only Linear layers of attention and MLP, and stacked MoE experts)")
    done: dict[str, int] = {}
    for name, node in chosen:
        node.quantize(fmt, double_quant=double_quant)
        done[name] = node.kernel.nbytes()
    return done


def quantized_paths(model) -> list[str]:
    """Slash-joined state paths of every quantized array in ``model``."""
    return ["/".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, QuantizedKernel))]


def quantized_param_count(model) -> int:
    """Weights the quantized kernels of ``model`` stand for (``in x out`` each, times the layers a stacked kernel
    holds): what its ``nnx.Param`` count leaves out."""
    total = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedWeight):
            per_layer = node.in_features * node.out_features
            codes_per_layer = per_layer if node.fmt == "int8" else -(-per_layer // 2)
            total += per_layer * (int(node.codes[...].size) // codes_per_layer)
    return total


def check_trainable(model, *, lora_enabled: bool, modules_to_save: list[str] = ()) -> None:
    """Refuse to train a quantized base: full fine-tuning, or ``modules_to_save`` naming a quantized layer."""
    paths = quantized_paths(model)
    if not paths:
        return
    if not lora_enabled:
        raise ConfigError(f"the base is quantized ({paths[0]} ...) and training a quantized base is not supported; "
                          "enable lora or set model.quantize=none")
    for pattern in modules_to_save:
        hits = [p for p in paths if re.search(pattern, p)]
        if hits:
            raise ConfigError(f"lora.modules_to_save entry {pattern!r} selects the quantized {hits[0]}; training a "
                              "quantized base is not supported")

