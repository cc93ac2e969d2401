"""The training loop around the pure step functions.

``Trainer(config)`` builds everything before anything compiles (mesh, model, tokenizer, data, adapters,
optimizer), so a bad config or dataset fails fast with a one-line error. ``fit()`` then loops: assemble the
global batch from this host's rows (``jax.make_array_from_process_local_data``, rows sharded over
(data, fsdp)), dispatch the jitted step, and only every ``log_every`` steps fetch the (already dispatched)
metrics of earlier steps, so the host never waits on the device step by step. Evaluation runs every
``eval_every`` steps and at the end; the model is written at the end (merged weights or a PEFT adapter).

Checkpointing (``checkpoint:`` section, :mod:`sftjax.train.checkpoint`): ``open_checkpoints()`` opens the run's
checkpoint manager and applies ``checkpoint.resume`` (restoring state, data iterator position, RNG and the loop
step); ``fit()`` then saves on the section's triggers, stops cleanly on SIGTERM/SIGINT after writing a checkpoint
(:class:`sftjax.train.preemption.PreemptionGuard`), and writes a final checkpoint at the last step. A failed periodic
save is logged and training goes on (the in-memory state is intact); a failed final save is an error. Without
``open_checkpoints()`` the loop does not checkpoint. ``add_hook(fn)`` runs ``fn(trainer, step)`` after each step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from sftjax.config import Config
from sftjax.data.pipeline import build_datasets
from sftjax.errors import CheckpointError, ConfigError
from sftjax.infer.evaluate import evaluate_generation
from sftjax.models.loading import save_model
from sftjax.models.tokenizer import load_tokenizer
from sftjax.models.scan import unstacked
from sftjax.models.zoo import resolve_model_path
from sftjax.peft.adapter_io import lora_adapters, write_peft_adapter
from sftjax.peft.init import RESIDUAL_INITS
from sftjax.peft.quant import quantized_param_count
from sftjax.sharding import make_mesh, to_host
from sftjax.train import checkpoint as ckpt
from sftjax.train import run_meta
from sftjax.train import flops as flops_lib
from sftjax.train.metrics import MetricsLogger, check_loggers, device_memory_bytes
from sftjax.train.preemption import PreemptionGuard
from sftjax.train.program import BATCH_KEYS, build_program, check_backend
from sftjax.train.step import TrainState

logger = logging.getLogger("sftjax.train")


class MetricsWindow:
    """Step metrics dispatched to the device but not yet fetched, written a window at a time.

    ``add`` collects a step's (device) metrics; ``close(step)`` ends the window at ``step``; ``write()`` fetches and
    writes a closed window (the loop calls it right after dispatching the next step, so the host never waits on
    the device); ``write_through(step)`` writes everything up to ``step`` now (before a checkpoint or a stop).
    """

    def __init__(self, write: Callable[[int, list[dict]], None]):
        self._write, self._pending, self._closed = write, [], None

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def close(self, step: int) -> None:
        if not self._pending:
            return
        self.write()
        self._closed, self._pending = (step, self._pending), []

    def write(self) -> None:
        if self._closed is not None:
            step, window = self._closed
            self._closed = None
            self._write(step, jax.device_get(window))

    def write_through(self, step: int) -> None:
        self.close(step)
        self.write()


class Trainer:
    """Fine-tunes ``config``'s model on its data; ``fit()`` runs the loop, ``evaluate()`` one evaluation.

    Everything before the loop is built by :func:`sftjax.train.program.build_program`, the recipe that ``plan``
    and ``export`` use too. ``model`` (an unadapted Decoder), ``tokenizer`` and the datasets may be passed in
    instead of being built from the config. A multi-process job must have joined before (``sftjax train`` does
    it: :func:`sftjax.train.distributed.initialize`).
    """

    def __init__(self, config: Config, *, model=None, tokenizer=None, train_data=None, eval_data=None):
        self.config = cfg = config
        train = cfg.train
        self.checkpoints = None  # the CheckpointManager, once open_checkpoints() ran
        self.mesh_sizes = cfg.check_devices(jax.device_count())
        check_loggers(train.loggers)  # a missing wandb/mlflow fails here, before the model loads
        self.mesh = make_mesh(**self.mesh_sizes)
        check_backend(cfg)
        self.tokenizer = tokenizer
        if self.tokenizer is None and (cfg.tokenizer.path or cfg.model.path):
            self.tokenizer = load_tokenizer(cfg.tokenizer.path or cfg.model.path)
        self.train_data, self.eval_data, self.data_stats = train_data, eval_data, {}
        if self.train_data is None:
            if cfg.data is None:
                raise ConfigError("data: the config has no data section (data.sources is required to train)")
            if self.tokenizer is None:
                raise ConfigError("tokenizer.path is required when the model is randomly initialized (model.init)")
            self.train_data, self.eval_data, self.data_stats = build_datasets(
                cfg.data, self.tokenizer, global_batch_size=train.global_batch_size)
        self.total_steps = self._total_steps()
        self.program = program = build_program(cfg, mesh=self.mesh, total_steps=self.total_steps,
                                               tokenizer=self.tokenizer, model=model)
        if cfg.model.scan_layers:
            logger.info("scan over layers: %s", program.model.scan_plan)
        self.model, self.model_config, self.lora_targets = program.model, program.model_config, program.lora_targets
        self.graphdef, self.frozen, self.state = program.graphdef, program.frozen, program.state
        self.tx, self.schedule = program.tx, program.schedule
        self.train_step, self.eval_step = program.train_step, program.eval_step
        self.batch_sharding, self.eval_sharding = program.batch_sharding, program.eval_sharding
        self.hooks: list[Callable] = []
        self.rng = jax.random.key(train.seed)
        self.start_step = 0
        self.num_params = int(sum(x.size for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))
                              + quantized_param_count(self.model))  # a QLoRA base computes with every weight
        self.num_trainable = program.num_trainable
        self.evaluated_from = None  # what for_evaluation() loaded
        # PiSSA/OLoRA rewrite the base: a PEFT adapter of the original base needs the adapters as initialized
        self.initial_adapters = None
        if self.lora_targets and cfg.lora.init in RESIDUAL_INITS and train.save == "adapter":
            # host copies: the train step donates (and so deletes) the state's arrays
            self.initial_adapters = {name: (to_host(a), to_host(b), scale) for name, (a, b, scale) in
                                     lora_adapters(self.updated_model(), self.model_config).items()}

    @classmethod
    def for_evaluation(cls, config: Config, *, source) -> "Trainer":
        """A Trainer holding what ``source`` trained, for ``evaluate()``: a run directory (its newest checkpoint,
        else its ``final/`` model), a checkpoint path, or a model (HF directory, .gguf, alias) that replaces
        ``model.path``. ``source=None`` evaluates the config's model as built (random init or untrained base).
        ``evaluated_from`` says which it was."""
        if source is None:
            trainer = cls(config)
            what = "model.init (random init)" if config.model.init is not None else f"{config.model.path} (base)"
            trainer.evaluated_from = f"untrained {what}"
            return trainer
        path = pathlib.Path(source)
        try:
            root, step = ckpt.resolve_checkpoint(path)
        except CheckpointError:
            root = None
        if root is not None:
            trainer = cls(config)
            manager = ckpt.CheckpointManager(root, config, read_only=True, keep=None)
            try:
                restored = manager.restore(step, {"params": ckpt.abstract_like(trainer.state.params)})
            finally:
                manager.close()
            trainer.state = dataclasses.replace(trainer.state, params=jax.device_put(
                restored.state["params"], jax.tree.map(lambda x: x.sharding, trainer.state.params)))
            trainer.evaluated_from = f"checkpoint {restored.directory}"
            return trainer
        model_dir = path / "final" if (path / "final").is_dir() else path
        if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
            raise CheckpointError(f"{model_dir} is a PEFT adapter without checkpoints beside it; evaluate the run's "
                                  "checkpoints (--from RUN) or a merged export")
        is_model = (model_dir / "config.json").is_file() or model_dir.suffix.lower() == ".gguf"
        if not is_model and not path.exists():
            try:  # an alias such as smollm2-135m-instruct
                model_dir = resolve_model_path(str(source))
                is_model = True
            except CheckpointError:
                is_model = False
        if not is_model:
            raise CheckpointError(f"nothing trained to evaluate in {path}: no checkpoints and no final/ model (train "
                                  "first, pass --from RUN_OR_CHECKPOINT_OR_MODEL, or --random-init for a baseline)")
        trainer = cls(config.replace(model=dataclasses.replace(config.model, path=str(model_dir), init=None)))
        trainer.evaluated_from = f"model {model_dir}"
        return trainer

    # ------------------------------------------------------------------------------------------ setup helpers

    def _total_steps(self) -> int:
        train = self.config.train
        if train.steps is not None:
            return train.steps
        steps_per_epoch = getattr(self.train_data, "steps_per_epoch", None)
        if not steps_per_epoch:
            raise ConfigError("train.epochs needs a dataset that knows its steps per epoch; give train.steps")
        return max(1, math.ceil(train.epochs * steps_per_epoch))

    def add_hook(self, hook: Callable) -> None:
        """``hook(trainer, step)`` after every dispatched step (e.g. a checkpoint manager's maybe_save)."""
        self.hooks.append(hook)

    def restore(self, state: TrainState, data_state: dict | None = None) -> None:
        """Resume from a saved TrainState (and data iterator state); it is placed like the fresh state."""
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.state = jax.device_put(state, shardings)
        self.start_step = int(jax.device_get(state.step))
        if data_state is not None and hasattr(self.train_data, "set_state"):
            self.train_data.set_state(data_state)

    # ------------------------------------------------------------------------------------------ checkpoints

    def open_checkpoints(self):
        """Open this run's checkpoint manager and apply ``checkpoint.resume``; returns the Restored or None.

        ``resume: never`` refuses a checkpoint directory that already holds checkpoints: the new run's saves and
        retention would delete them. Use another ``train.output_dir``/``checkpoint.directory`` or remove them.
        """
        cfg = self.config
        base_model = None
        if cfg.model.path:
            resolved = resolve_model_path(cfg.model.path).absolute()
            base_model = {"path": str(resolved), "fingerprint": run_meta.fingerprint_model(resolved)}
        manager = ckpt.manager_for(cfg.checkpoint, cfg.train.output_dir, cfg, base_model=base_model)
        try:
            if cfg.checkpoint.resume in ("never", "none") and manager.all_steps:
                raise CheckpointError(
                    f"checkpoint.resume=never but {manager.directory} already holds checkpoints (steps "
                    f"{manager.all_steps}); refusing to overwrite them: resume with checkpoint.resume=auto, or use "
                    "another train.output_dir (or checkpoint.directory), or delete them yourself")
            restored = ckpt.restore_for_resume(cfg.checkpoint.resume, manager,
                                              ckpt.abstract_like(ckpt.train_state_items(self.state)))
            if restored is not None:
                self._check_base_model(restored, base_model)
        except BaseException:
            manager.close()
            raise
        self.checkpoints = manager
        if restored is not None:
            self.restore(ckpt.train_state_from_items(self.state, restored.state), restored.data_state)
            self.start_step = restored.step  # the loop's step: TrainState.step does not count skipped steps
            if restored.rng is not None:
                self.rng = restored.rng
            logger.info("resumed from checkpoint %s at step %d of %d", restored.directory, restored.step,
                        self.total_steps)
        return restored

    def _check_base_model(self, restored, base_model: dict | None) -> None:
        """LoRA checkpoints hold only the adapters: resuming them on other base weights would silently train a
        different model. (Full fine-tuning restores every weight, so the base does not matter there.)"""
        saved = (restored.meta or {}).get("base_model") or {}
        if not self.config.lora.enabled or not base_model or not saved.get("fingerprint"):
            return
        if saved["fingerprint"] != base_model["fingerprint"]:
            raise CheckpointError(
                f"checkpoint {restored.directory} was trained on base model {saved.get('path')} but model.path "
                f"{base_model['path']} has other weights (fingerprint {saved['fingerprint']} -> "
                f"{base_model['fingerprint']}); resume with the same base model or start a new run")

    def _save_checkpoint(self, step: int, *, force: bool, metrics: dict | None = None) -> None:
        """Start a checkpoint at ``step`` (on the triggers, or now when ``force``); a failure is logged, not raised:
        the in-memory state is intact and the next save may succeed."""
        try:
            self.checkpoints.maybe_save(step, ckpt.train_state_items(self.state), data_state=self.train_data.get_state(),
                                        rng=self.rng, metrics=metrics, force=force)
        except CheckpointError as err:
            logger.error("%s; training continues", err)

    def _final_checkpoint(self, step: int) -> pathlib.Path:
        """Write the checkpoint at ``step`` and wait until it is committed (errors raise)."""
        manager = self.checkpoints
        try:
            manager.wait()  # an earlier background save's error must not be mistaken for this one's
        except CheckpointError as err:
            logger.error("%s", err)
        manager.save(step, ckpt.train_state_items(self.state), data_state=self.train_data.get_state(), rng=self.rng)
        manager.wait()
        return manager.directory / str(step)

    def close_checkpoints(self) -> None:
        """Release the checkpoint manager (finishing any pending write)."""
        if self.checkpoints is not None:
            manager, self.checkpoints = self.checkpoints, None
            manager.close()

    def global_batch(self, local: dict) -> dict:
        """Host-local [local_rows, L] arrays -> global [accum, micro_rows, L] arrays sharded over (data, fsdp)."""
        accum = self.config.train.accum_steps
        out = {}
        for key in BATCH_KEYS:
            value = np.asarray(local[key], np.int32)
            rows, length = value.shape
            if rows % accum:
                raise ConfigError(f"train.micro_batch_size: {rows} local rows do not split into {accum} micro-batches")
            value = value.reshape(accum, rows // accum, length)
            out[key] = jax.make_array_from_process_local_data(self.batch_sharding, value)
        return out

    # ----------------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train up to ``total_steps`` steps; returns the last logged train metrics and the final eval metrics,
        plus ``stopped_at``/``checkpoint`` when a stop signal ended the run early (no final model then)."""
        cfg = self.config.train
        out_dir = pathlib.Path(cfg.output_dir)
        log = MetricsLogger(out_dir, total_steps=self.total_steps, tensorboard=cfg.tensorboard,
                            progress=cfg.progress, initial_step=self.start_step, train=cfg,
                            run_config=self.config.to_dict())
        peak = cfg.peak_flops or flops_lib.device_peak_flops()
        seq_len = int(self.config.data.max_length) if self.config.data is not None else None
        data_iter = iter(self.train_data)
        last_train, last_eval = {}, {}
        # Timing is measured between host syncs (fetching step N's metrics waits for step N on device), so
        # asynchronous dispatch does not inflate throughput. The first window includes compilation.
        sync = {"time": time.perf_counter(), "step": self.start_step}
        stopped = {}

        def write(at: int, fetched: list[dict]) -> None:
            nonlocal last_train
            now = time.perf_counter()
            last_train = self._summarize(fetched, now - sync["time"], at - sync["step"], seq_len, peak)
            sync.update(time=now, step=at)
            log.log(at, last_train)

        window = MetricsWindow(write)
        guard = PreemptionGuard() if self.checkpoints is not None else None
        try:
            with guard if guard is not None else contextlib.nullcontext():
                for step in range(self.start_step, self.total_steps):
                    local = next(data_iter)
                    seq_len = seq_len or int(np.asarray(local["tokens"]).shape[1])
                    batch = self.global_batch(local)
                    self.state, metrics = self.train_step(self.state, self.frozen, batch,
                                                          jax.random.fold_in(self.rng, step))
                    window.write()  # the previous window's metrics: step N+1 is already dispatched
                    window.add(metrics)
                    done = step + 1
                    for hook in self.hooks:
                        hook(self, done)
                    log.advance()
                    last = done == self.total_steps
                    if done % cfg.log_interval == 0 or last:
                        window.close(done)
                    evaluated = False
                    if ((cfg.eval_every and done % cfg.eval_every == 0) or last) and self.eval_data is not None:
                        window.write()
                        last_eval, evaluated = self.evaluate(), True
                        log.log(done, last_eval, prefix="eval/")
                        sync.update(time=time.perf_counter(), step=done)
                    every = cfg.generate_eval_every
                    if every and (done % every == 0 or last) and self.eval_data is not None:
                        window.write()
                        generated = self.evaluate_generation()
                        last_eval = {**last_eval, "accuracy": generated["accuracy"]}
                        log.log(done, {"accuracy": generated["accuracy"], "accuracy_scored": generated["scored"]},
                                prefix="eval/")
                        sync.update(time=time.perf_counter(), step=done)
                    if guard is None or last:
                        continue
                    if self.checkpoints.should_save(done):
                        # Metrics of every step up to a checkpoint reach metrics.jsonl before it exists: a run
                        # killed later resumes after this step and would never log those steps again.
                        window.write_through(done)
                        self._save_checkpoint(done, force=True,
                                              metrics={"eval_loss": last_eval["loss"]} if evaluated else None)
                    if guard.should_stop(done):
                        window.write_through(done)  # the partial window: the resumed run starts after it
                        stopped = {"stopped_at": done, "checkpoint": str(self._final_checkpoint(done))}
                        print(guard.stop_message(stopped["checkpoint"]), flush=True)
                        break
                window.write()
                if not stopped and self.checkpoints is not None:
                    self._final_checkpoint(self.total_steps)
        finally:
            log.close()
        if not stopped and cfg.save != "none":
            self.save(out_dir / "final")  # every process takes part in gathering the weights; process 0 writes
        return {"train": last_train, "eval": last_eval, **stopped}

    def _summarize(self, fetched, elapsed, steps, seq_len, peak) -> dict:
        # tokens_per_s counts every slot of the [B, L] batches (padding included: what the device computes on);
        # real_tokens_per_s the non-padding tokens (segment_ids != 0); trained_tokens_per_s the loss-mask tokens.
        tokens = sum(float(m["trained_tokens"]) for m in fetched)
        real = sum(float(m["real_tokens"]) for m in fetched)
        last = fetched[-1]
        all_tokens = steps * self.config.train.global_batch_size * (seq_len or 0)
        out = {
            "loss": float(last["loss"]),
            "grad_norm": float(last["grad_norm"]),
            "learning_rate": float(last["learning_rate"]),
            "step_time_s": elapsed / max(steps, 1),
            "tokens_per_s": all_tokens / max(elapsed, 1e-9),
            "real_tokens_per_s": real / max(elapsed, 1e-9),
            "trained_tokens_per_s": tokens / max(elapsed, 1e-9),
            "skipped_steps": float(sum(int(m["skipped"]) for m in fetched)),
            "nonfinite_steps": float(jax.device_get(self.state.nonfinite_steps)),
        }
        if "router_aux_loss" in last:  # MoE: the last step's router losses, the window's tokens per expert
            out.update(router_aux_loss=float(last["router_aux_loss"]), router_z_loss=float(last["router_z_loss"]))
            out.update({key: sum(float(m[key]) for m in fetched) for key in last if key.startswith("expert_tokens_")})
        if seq_len and peak:
            per_token = flops_lib.model_flops_per_token(self.model_config, num_params=self.num_params,
                                                        num_trainable_params=self.num_trainable, seq_len=seq_len)
            out["mfu"] = per_token * out["tokens_per_s"] / (peak * jax.device_count())
        out.update(device_memory_bytes())
        return out

    def evaluate(self) -> dict:
        """Loss, perplexity and token accuracy over the eval data (at most train.eval_batches batches)."""
        if self.eval_data is None:
            return {}
        loss_sum = tokens = correct = 0.0
        results = []
        for index, local in enumerate(self.eval_data):
            if self.config.train.eval_batches is not None and index >= self.config.train.eval_batches:
                break
            batch = {k: jax.make_array_from_process_local_data(self.eval_sharding, np.asarray(local[k], np.int32))
                     for k in BATCH_KEYS}
            results.append(self.eval_step(self.state.params, self.frozen, batch))
        for r in jax.device_get(results):
            loss_sum += float(r["loss_sum"])
            tokens += float(r["trained_tokens"])
            correct += float(r["correct_tokens"])
        loss = loss_sum / tokens if tokens else 0.0
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / tokens if tokens
                else 0.0, "trained_tokens": tokens}

    def evaluate_generation(self, **options) -> dict:
        """Decode the eval prompts with the current weights and score the answers (``train.generate_eval_*``;
        keyword arguments override them); see :func:`sftjax.infer.evaluate.evaluate_generation`."""
        train = self.config.train
        settings = {"answer": train.generate_eval_answer, "limit": train.generate_eval_limit,
                    "max_new_tokens": train.generate_eval_max_new_tokens,
                    "chat_template": self.config.data.chat_template if self.config.data else None, **options}
        return evaluate_generation(self.updated_model(), self.tokenizer, self.eval_data.examples, **settings)

    # --------------------------------------------------------------------------------------------- outputs

    def updated_model(self):
        """The model with the current trained params (a new module, one module per layer; adapters not merged)."""
        return unstacked(nnx.merge(self.graphdef, self.state.params, self.frozen))

    def save(self, out_dir) -> pathlib.Path:
        """Write the trained model: merged HF weights, or a PEFT adapter (train.save=adapter)."""
        model = self.updated_model()
        out_dir = pathlib.Path(out_dir)
        if self.config.train.save == "adapter" and self.lora_targets:
            lora = dataclasses.asdict(self.config.lora)
            return write_peft_adapter(model, self.model_config, out_dir, lora=lora,
                                      base_model_name_or_path=str(self.config.model.path or ""),
                                      initial_adapters=self.initial_adapters)
        return save_model(model, self.model_config, out_dir, dtype=self.config.model.param_dtype,
                          tokenizer=self.tokenizer)
