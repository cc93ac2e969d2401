"""LoRA and full fine-tuning as one code path: what trains is a filter over the model's state tree.

``apply_lora`` adds PEFT-style adapters (``nnx.LoRAParam`` A/B next to each frozen kernel) to the ``Linear``
modules named by ``target_modules``. ``trainable_filter`` then says which variables train: ``nnx.LoRAParam``
with LoRA, ``nnx.Param`` for full fine-tuning, plus ``modules_to_save`` regexes (e.g. embeddings and head)
in both cases. ``split_model`` splits the model into (graphdef, trainable, frozen) once; the train step
differentiates and optimizes only ``trainable``, so frozen weights never get gradient or optimizer memory.

Target matching follows PEFT: a plain name matches a module whose dotted path ends with it (``q_proj``
matches ``layers.3.self_attn.q_proj``); an entry with regex characters must match the whole dotted path;
``all-linear`` targets every linear layer except the output head.
"""

from __future__ import annotations

import re

from flax import nnx

from sftjax.config import LoraSection
from sftjax.errors import ConfigError

HEAD_NAMES = ("lm_head", "head", "output")
_REGEX_CHARS = set("*+?[](){}|^$\\")


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def linear_modules(model) -> dict[str, nnx.Module]:
    """Dotted path -> every module that supports ``enable_lora`` (the model's Linear layers)."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "enable_lora") and path:
            found[_dotted(path)] = node
    return found


def _matches(name: str, pattern: str) -> bool:
    if any(c in _REGEX_CHARS for c in pattern):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def select_targets(names: list[str], target_modules: list[str] | str) -> list[str]:
    """The module paths LoRA applies to; a target that matches nothing is a one-line ConfigError."""
    if target_modules == "all-linear":
        chosen = [n for n in names if n.split(".")[-1] not in HEAD_NAMES]
        if not chosen:
            raise ConfigError("lora.target_modules=all-linear found no linear layers in the model")
        return chosen
    chosen = []
    for pattern in target_modules:
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            leaves = sorted({n.split(".")[-1] for n in names})
            experts = [n for n in names if ".experts." in n]
            hint = f"; MoE expert projections are stacked, e.g. {experts[0]}" if experts else ""
            raise ConfigError(f"lora.target_modules entry {pattern!r} matches no module; linear modules are named "
                              f"{', '.join(leaves)} (e.g. {names[0] if names else '-'}){hint}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def apply_lora(model, cfg: LoraSection, *, rngs: nnx.Rngs, dora: bool | None = None) -> list[str]:
    """Add adapters in place to the target modules (initialized per ``lora.init``, with DoRA's magnitude when
    ``dora``, default ``lora.use_dora``); returns their dotted paths. No-op when disabled. A run on a quantized
    base passes ``dora=False`` and enables DoRA after quantizing (see :func:`sftjax.train.program.adapt`)."""
    if not cfg.enabled:
        return []
    if getattr(model, "scan_plan", None) is not None:
        raise ConfigError("apply_lora: the model's layers are already stacked for scanning; add LoRA before "
                          "sftjax.models.scan.stack_layers")
    modules = linear_modules(model)
    targets = select_targets(list(modules), cfg.target_modules)
    check_modules_to_save(model, cfg.modules_to_save)
    dora = cfg.use_dora if dora is None else dora
    extra = {"init": cfg.init, "use_dora": dora} if cfg.init != "default" or dora else {}
    for name in targets:
        module = modules[name]
        if extra and not hasattr(module, "enable_dora"):
            raise ConfigError(f"lora.init={cfg.init}, lora.use_dora={dora}: {name} is a "
                              f"{type(module).__name__}, whose adapters support neither; target other modules")
        module.enable_lora(cfg.r, cfg.alpha, rslora=cfg.rslora, dropout=cfg.dropout, rngs=rngs,
                           **(extra | {"name": name} if extra else {}))
    return targets


def _param_paths(model) -> list[str]:
    return ["/".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def check_modules_to_save(model, patterns: list[str]) -> None:
    paths = _param_paths(model)
    for pattern in patterns:
        if not any(re.search(pattern, p) for p in paths):
            raise ConfigError(f"lora.modules_to_save entry {pattern!r} matches no parameter path "
                              f"(e.g. {', '.join(paths[:4])})")


def trainable_filter(cfg: LoraSection, *, scan_plan=None):
    """nnx filter selecting the variables that train (LoRA adapters or all params, plus modules_to_save).

    ``modules_to_save`` patterns always match per-layer paths (``layers/3/mlp/...``); on a model with stacked
    layers (``scan_plan``, see :mod:`sftjax.models.scan`) a stacked variable trains when its pattern matches every
    layer it stacks, and a pattern that matches only some of them is a ConfigError (they share one array).
    """
    from sftjax.models.scan import unstacked_paths

    base = nnx.LoRAParam if cfg.enabled else nnx.Param
    patterns = [re.compile(p) for p in cfg.modules_to_save]
    if not patterns:
        return base

    def saved(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        names = ["/".join(str(p) for p in layer_path) for layer_path in unstacked_paths(scan_plan, path)]
        hits = [any(p.search(name) for p in patterns) for name in names]
        if any(hits) and not all(hits):
            raise ConfigError(f"lora.modules_to_save {cfg.modules_to_save} selects {names[hits.index(True)]} but not "
                              f"{names[hits.index(False)]}; with model.scan_layers those layers share one stacked "
                              "array: select all layers or none, or set model.scan_layers=false")
        return all(hits)

    return nnx.Any(base, saved)


def split_model(model, cfg: LoraSection):
    """(graphdef, trainable, frozen): the model's state split by ``trainable_filter``."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg, scan_plan=getattr(model, "scan_plan", None)),
                                            ...)
    return graphdef, trainable, frozen


def merge_lora(model) -> int:
    """Fold every adapter into its kernel in place (``kernel = merged_kernel()``) and drop A/B; returns count."""
    count = 0
    for _, module in linear_modules(model).items():
        if getattr(module, "lora_a", None) is not None:
            if hasattr(module, "fold_adapter"):
                module.fold_adapter()
            else:
                module.kernel[...] = module.merged_kernel()
                module.lora_a = None
                module.lora_b = None
            count += 1
    return count
