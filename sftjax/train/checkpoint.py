"""Training checkpoints: asynchronous, sharded, crash-safe, resumable onto another mesh.

Design in plain words
---------------------
One run directory holds one ``orbax.checkpoint.CheckpointManager`` root; every checkpoint is a numbered step
directory with these items:

* one orbax PyTree item per entry of the ``state`` mapping the trainer hands us (typically ``params`` -- only the
  LoRA adapters for LoRA -- and ``opt_state``). Arrays are written and read *sharded* by orbax; on restore the
  caller passes an *abstract* state (``jax.ShapeDtypeStruct`` leaves carrying the current mesh's shardings), so a
  checkpoint written on 8 devices restores onto 4 or 1 (or a pod) unchanged.
* ``meta`` (JSON): step, the resolved run config, a reference to the base model (path + fingerprint), the RNG
  state (key data, small) and the metrics given at save time.
* ``data_state`` (JSON): the data pipeline's iterator state, so a resumed run sees exactly the batches it would
  have seen.

Saving is asynchronous: orbax copies the arrays to host memory and writes them in a background thread while
training continues. Orbax first writes into a temporary directory and renames it into place only when every item
is complete, so a process killed mid-save leaves the previous checkpoints untouched and a ``*.orbax-checkpoint-
tmp-*`` directory that is ignored (and cleaned up when the next manager opens the directory). Errors of a
background save (a full disk, say) are re-raised as one-line :class:`CheckpointError` at the next save, ``wait()``
or ``close()``; the in-memory training state is never touched by a save, so training can carry on or stop cleanly.

Retention keeps the newest ``keep`` checkpoints plus, optionally, the ``keep_best`` ones with the lowest
``eval_loss`` (orbax preservation policies).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as preservation

from sftjax.errors import CheckpointError
from sftjax.train.run_meta import (DEFAULT_COMPATIBILITY_KEYS, config_differences, config_to_dict, rng_from_json,
                                   rng_to_json)

log = logging.getLogger(__name__)

META_ITEM = "meta"
DATA_ITEM = "data_state"
RESERVED_ITEMS = (META_ITEM, DATA_ITEM)
FORMAT_VERSION = 1


@dataclasses.dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` gives back."""

    state: dict[str, Any]
    data_state: dict | None
    step: int
    rng: Any
    meta: dict
    directory: pathlib.Path


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}"[:400]


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """Path -> shape of every array-like leaf (abstract or concrete, or orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _path_name(path) -> str:
    """'layers/0/attn/q_proj/lora_a': orbax stores every key as a string, so int and str keys compare equal."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _structure_differences(saved_meta: Any, abstract: Any, limit: int = 4) -> list[str]:
    saved, wanted = _leaf_shapes(saved_meta), _leaf_shapes(abstract)
    diffs = [f"{k} missing in checkpoint" for k in sorted(set(wanted) - set(saved))]
    diffs += [f"{k} not expected by this run" for k in sorted(set(saved) - set(wanted))]
    diffs += [f"{k} shape {saved[k]} -> {wanted[k]}" for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... {len(diffs) - limit} more"]
    return diffs


def abstract_like(tree: Any) -> Any:
    """The abstract (shape, dtype, sharding) version of a concrete pytree, usable as a restore target."""

    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.ndarray | np.generic):
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        return x

    return jax.tree_util.tree_map(one, tree)


def manager_for(section, output_dir, config: Any = None, **kwargs) -> CheckpointManager:
    """The manager a ``checkpoint:`` section (:class:`sftjax.config.CheckpointSection`) describes, rooted at its
    ``directory`` or ``<output_dir>/checkpoints``."""
    directory = section.directory or pathlib.Path(output_dir) / "checkpoints"
    return CheckpointManager(directory, config, save_every_steps=section.save_every_steps,
                             save_every_minutes=section.save_every_minutes, keep=section.keep,
                             keep_best=section.keep_best, async_save=section.async_save, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# train state <-> checkpoint items

STATE_ITEM_FIELDS = ("params", "opt_state")  # each its own orbax item; export reads only "params"
COUNTERS_ITEM = "counters"


def train_state_items(train_state: Any) -> dict[str, Any]:
    """A dataclass train state (``sftjax.train.step.TrainState``) -> the ``state`` mapping to save.

    ``params`` (the trainable nnx.State: adapters for LoRA) and ``opt_state`` become items of their own; every
    other field (step and counters) goes into ``counters``.
    """
    fields = {f.name: getattr(train_state, f.name) for f in dataclasses.fields(train_state)}
    items = {name: fields.pop(name) for name in STATE_ITEM_FIELDS if name in fields}
    if fields:
        items[COUNTERS_ITEM] = fields
    return items


def train_state_from_items(template: Any, items: Mapping[str, Any]) -> Any:
    """The inverse of :func:`train_state_items`: ``template`` with its fields replaced by the restored ones."""
    changes = {name: items[name] for name in STATE_ITEM_FIELDS if name in items}
    changes.update(items.get(COUNTERS_ITEM, {}))
    return dataclasses.replace(template, **changes)


# ----------------------------------------------------------------------------------------------------------------
# locating checkpoints


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and path.name.isdigit() and (path / META_ITEM).is_dir()


def resolve_checkpoint(path: str | os.PathLike) -> tuple[pathlib.Path, int | None]:
    """A user-given checkpoint path -> (manager root, step or None for the newest).

    Accepts a manager root (``run/checkpoints``), a run directory containing ``checkpoints/``, or one step
    directory (``run/checkpoints/1200``). Anything else is a one-line :class:`CheckpointError`.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if _is_step_dir(path):
        return path.parent, int(path.name)
    for root in (path, path / "checkpoints"):
        if root.is_dir() and any(_is_step_dir(p) for p in root.iterdir()):
            return root, None
    if path.is_dir() and path.name.isdigit() and (path / "_CHECKPOINT_METADATA").exists():
        raise CheckpointError(f"checkpoint {path} is not an sftjax checkpoint (no '{META_ITEM}' item)")
    raise CheckpointError(
        f"no sftjax checkpoint found in {path} (expected numbered step directories containing '{META_ITEM}/')"
    )


# ----------------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores training checkpoints of one run (see the module docstring).

    Args:
      directory: the checkpoint root (created if missing), e.g. ``<run>/checkpoints``.
      config: the resolved run config (dataclass or mapping), stored as JSON and checked on restore.
      save_every_steps / save_every_minutes: when :meth:`maybe_save` actually saves (either trigger; None = off).
      keep: newest checkpoints to keep (None = all).
      keep_best: additionally keep this many with the lowest ``best_metric`` (0 = off).
      base_model: a reference to the frozen base (e.g. ``{"path": ..., "fingerprint": ...}``) stored in ``meta``;
        for LoRA the checkpoint holds only the adapters, so the base must be found again to export or resume.
      compatibility_keys: config sections that must match on restore.
      async_save: write in a background thread (False: each save blocks until committed).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        config: Any = None,
        *,
        save_every_steps: int | None = None,
        save_every_minutes: float | None = None,
        keep: int | None = 3,
        keep_best: int = 0,
        best_metric: str = "eval_loss",
        base_model: Mapping | None = None,
        compatibility_keys=DEFAULT_COMPATIBILITY_KEYS,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = pathlib.Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} is a file")
        if save_every_steps is not None and save_every_steps <= 0:
            raise CheckpointError(f"checkpoint.save_every_steps must be positive, got {save_every_steps}")
        if save_every_minutes is not None and save_every_minutes <= 0:
            raise CheckpointError(f"checkpoint.save_every_minutes must be positive, got {save_every_minutes}")
        self.config = config_to_dict(config)
        self.save_every_steps = save_every_steps
        self.save_every_minutes = save_every_minutes
        self.best_metric = best_metric
        self.base_model = dict(base_model) if base_model else None
        self.compatibility_keys = tuple(compatibility_keys)
        self._last_save_time = time.monotonic()
        self._pending_step: int | None = None

        policies = [preservation.LatestN(n=keep)]
        if keep_best:
            policies.append(
                preservation.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=True,  # ascending loss sorted descending: the last n are the lowest
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation.AnyPreservationPolicy(policies=policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as err:  # noqa: BLE001 - anything orbax raises here is about the directory
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {_one_line(err)}") from err

    # ------------------------------------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Whether the step or time trigger fires at ``step`` (it does not save)."""
        if self.save_every_steps and step % self.save_every_steps == 0:
            return True
        if not self.save_every_minutes:
            return False
        due = time.monotonic() - self._last_save_time >= 60 * self.save_every_minutes
        if jax.process_count() > 1:
            # clocks differ between hosts; a save is collective, so every host follows process 0's decision
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due

    def maybe_save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        data_state: Mapping | None = None,
        rng: Any = None,
        metrics: Mapping | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving ``state`` at ``step`` if a trigger fires (or ``force``); returns whether it started.

        ``state`` maps item names (e.g. ``params``, ``opt_state``) to pytrees of arrays; it is read, never
        modified, and the call returns as soon as the arrays are copied to host memory.
        """
        self._raise_background_error()
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False  # e.g. the final save at a step a periodic save already wrote
        if not isinstance(state, Mapping) or not state:
            raise TypeError("state must be a non-empty mapping of item name -> pytree")
        bad = [k for k in state if k in RESERVED_ITEMS or not str(k).isidentifier()]
        if bad:
            raise ValueError(f"state item names {bad} are reserved or not identifiers")
        meta = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "state_items": sorted(state),
            "config": self.config,
            "base_model": self.base_model,
            "rng": rng_to_json(rng),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        items = {name: ocp.args.StandardSave(tree) for name, tree in state.items()}
        items[META_ITEM] = ocp.args.JsonSave(meta)
        items[DATA_ITEM] = ocp.args.JsonSave(dict(data_state) if data_state is not None else None)
        orbax_metrics = None
        if metrics and self.best_metric in metrics:
            orbax_metrics = {self.best_metric: float(metrics[self.best_metric])}
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=orbax_metrics, force=True)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - I/O errors of the synchronous part of the save
            raise self._save_error(step, err) from err
        self._pending_step = int(step)
        self._last_save_time = time.monotonic()
        log.info("checkpoint step %d: writing to %s in the background", step, self.directory / str(step))
        return True

    def save(self, step: int, state: Mapping[str, Any], **kwargs) -> bool:
        """Save now regardless of triggers (the final / preemption checkpoint)."""
        return self.maybe_save(step, state, force=True, **kwargs)

    def _save_error(self, step, err: BaseException) -> CheckpointError:
        """A one-line error for a failed save; the partial temporary directory is removed to free the disk."""
        chain, cause = [], err
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        text = " ".join(str(c) for c in chain)
        os_errors = [c for c in chain if isinstance(c, OSError) and c.strerror]
        if any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in chain) or "No space left" in text:
            reason = "no space left on device (errno 28)"
        elif os_errors:
            reason = f"{os_errors[0].strerror} (errno {os_errors[0].errno})"
        else:
            reason = _one_line(err)
        if step is not None:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        return CheckpointError(
            f"saving checkpoint step {step} to {self.directory} failed: {reason}; "
            "the previous checkpoints and the in-memory training state are intact"
        )

    def _raise_background_error(self) -> None:
        try:
            self._manager.check_for_errors()
        except Exception as err:  # noqa: BLE001
            step, self._pending_step = self._pending_step, None
            raise self._save_error(step, err) from err

    def wait(self) -> None:
        """Block until the background save (if any) is committed; raise its error as CheckpointError."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            step, self._pending_step = self._pending_step, None
            raise self._save_error(step, err) from err
        self._pending_step = None

    def close(self) -> None:
        """Finish pending writes and release orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------------ reading

    @property
    def all_steps(self) -> list[int]:
        """Steps of the complete (committed) checkpoints, ascending."""
        return sorted(self._manager.all_steps(read=True))

    @property
    def latest_step(self) -> int | None:
        steps = self.all_steps
        return steps[-1] if steps else None

    def read_meta(self, step: int) -> dict:
        """The ``meta`` item of one step (config, base model reference, metrics, rng)."""
        step_dir = self.directory / str(step)
        meta_file = step_dir / META_ITEM / "metadata"
        if not step_dir.is_dir():
            raise CheckpointError(f"checkpoint step {step} not found in {self.directory}")
        if not (step_dir / META_ITEM).is_dir():
            raise CheckpointError(f"checkpoint {step_dir} is not an sftjax checkpoint (no '{META_ITEM}' item)")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
            meta = meta[META_ITEM]
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {step_dir} is corrupt: cannot read {meta_file.name}: {_one_line(err)}") from err
        if not isinstance(meta, dict) or "format_version" not in meta:
            raise CheckpointError(f"checkpoint {step_dir} is not an sftjax checkpoint (meta has no format_version)")
        return meta

    def check_compatible(self, meta: Mapping, step_dir: pathlib.Path) -> None:
        diffs = config_differences(meta.get("config"), self.config, self.compatibility_keys)
        if diffs:
            raise CheckpointError(
                f"checkpoint {step_dir} was written with an incompatible config: {'; '.join(diffs)}"
            )

    def restore(self, step: int | None, abstract_state: Mapping[str, Any], *, check_config: bool = True) -> Restored:
        """Restore ``step`` (None = newest) onto the shardings of ``abstract_state``.

        ``abstract_state`` has the same item names and tree structure as the saved ``state`` with
        ``jax.ShapeDtypeStruct`` leaves (see :func:`abstract_like`, or ``nnx.eval_shape`` + sharding rules).
        Items absent from ``abstract_state`` are not read (export reads only ``params``).
        """
        if step is None:
            step = self.latest_step
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
        step_dir = self.directory / str(step)
        meta = self.read_meta(step)
        if check_config:
            self.check_compatible(meta, step_dir)
        missing = sorted(set(abstract_state) - set(meta.get("state_items", [])))
        if missing:
            raise CheckpointError(f"checkpoint {step_dir} has no item(s) {missing}; it holds {meta.get('state_items')}")
        for name, abstract in abstract_state.items():
            try:
                saved = ocp.StandardCheckpointHandler().metadata(step_dir / name)
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"checkpoint {step_dir} item '{name}' is corrupt: {_one_line(err)}") from err
            saved = getattr(saved, "tree", saved)
            if saved is not None:
                diffs = _structure_differences(saved, abstract)
                if diffs:
                    raise CheckpointError(
                        f"checkpoint {step_dir} item '{name}' does not match this run's state: {'; '.join(diffs)}"
                    )
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_state.items()}
        args[DATA_ITEM] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {step_dir} is corrupt or unreadable: {_one_line(err)}") from err
        state = {name: restored[name] for name in abstract_state}
        log.info("restored checkpoint %s", step_dir)
        return Restored(
            state=state,
            data_state=restored[DATA_ITEM],
            step=int(step),
            rng=rng_from_json(meta.get("rng")),
            meta=meta,
            directory=step_dir,
        )

    def restore_latest(self, abstract_state: Mapping[str, Any], *, check_config: bool = True) -> Restored | None:
        """Restore the newest complete checkpoint, or return None when there is none yet."""
        if self.latest_step is None:
            return None
        return self.restore(None, abstract_state, check_config=check_config)


def restore_for_resume(
    resume: str | None,
    manager: CheckpointManager,
    abstract_state: Mapping[str, Any],
) -> Restored | None:
    """Apply the ``resume`` setting: ``auto`` (newest complete checkpoint of ``manager``, or None when there is
    none), ``never``/None (None), or a path to a checkpoint root, run directory or step directory."""
    if resume in (None, "never", "none", False):
        return None
    if resume == "auto":
        return manager.restore_latest(abstract_state)
    root, step = resolve_checkpoint(resume)
    if root.absolute() == manager.directory:
        return manager.restore(step, abstract_state)
    source = CheckpointManager(
        root,
        manager.config,
        keep=None,
        compatibility_keys=manager.compatibility_keys,
        read_only=True,
    )
    try:
        return source.restore(step, abstract_state)
    finally:
        source.close()
