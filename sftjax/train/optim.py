"""Optimizers and learning-rate schedules, built from the ``optim:`` config section.

The optimizer only ever sees the trainable part of the state tree (see ``sftjax.peft.lora``), so frozen
weights get neither gradient memory nor optimizer state. Weight decay skips parameters whose path matches one
of ``optim.no_decay`` (norms, biases and embeddings by default). Gradient clipping is done by the train step
(which also reports the norm), not here.
"""

from __future__ import annotations

import re

import jax
import optax

from sftjax.config import OptimSection


def make_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Warmup (linear from 0) then constant / linear decay / cosine decay to ``learning_rate * min_lr_ratio``."""
    peak = cfg.learning_rate
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = peak * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(peak, end, decay_steps)
    else:
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def path_string(path) -> str:
    """'layers/0/self_attn/q_proj/kernel' from a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def decay_mask(params, no_decay: list[str]):
    """Pytree of bools: True where weight decay applies (path matches none of ``no_decay``)."""
    patterns = [re.compile(p) for p in no_decay]

    def decays(path, _):
        name = path_string(path)
        return not any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


LORAPLUS_PATTERN = re.compile(r"(^|/)lora_b(/|$)")


def loraplus_mask(params):
    """Pytree of bools: True on the leaves LoRA+ speeds up, as peft's ``create_loraplus_optimizer`` groups them:
    every ``lora_b`` and every 1-D trainable leaf (DoRA magnitudes, trained biases)."""
    def fast(path, leaf):
        return bool(LORAPLUS_PATTERN.search(path_string(path))) or getattr(leaf, "ndim", 0) == 1

    return jax.tree_util.tree_map_with_path(fast, params)


def make_optimizer(cfg: OptimSection, total_steps: int, *, lr_ratio: float | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for the trainable params, and its learning-rate schedule (for logging).

    ``lr_ratio`` (``lora.lr_ratio``, LoRA+): the leaves of :func:`loraplus_mask` train with learning rate
    ``schedule x lr_ratio``. Every optimizer here multiplies its whole update (decoupled weight decay included) by
    the learning rate, so that is the update scaled by ``lr_ratio`` on those leaves: the same as a torch optimizer
    with a second parameter group at ``lr x lr_ratio``."""
    tx, schedule = _base_optimizer(cfg, total_steps)
    if lr_ratio is not None and lr_ratio != 1.0:
        tx = optax.chain(tx, optax.masked(optax.scale(lr_ratio), loraplus_mask))
    return tx, schedule


def _base_optimizer(cfg: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                         mask=lambda p: decay_mask(p, cfg.no_decay))
    elif cfg.name == "adafactor":
        # optax.adafactor adds weight_decay_rate * param after its learning-rate scaling (param *= 1 - wd per
        # step); decay here is decoupled and scaled by the learning rate, as for adamw and torch's Adafactor
        # (param *= 1 - lr * wd): the schedule multiplies the whole update, decay term included.
        tx = optax.chain(optax.adafactor(None, weight_decay_rate=cfg.weight_decay or None,
                                         weight_decay_mask=lambda p: decay_mask(p, cfg.no_decay)),
                         optax.scale_by_learning_rate(schedule, flip_sign=False))
    else:
        tx = optax.sgd(schedule, momentum=cfg.momentum or None)
        if cfg.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.no_decay)),
                             tx)
    return tx, schedule
