"""Joining a multi-process job (a TPU pod, a SLURM or MPI GPU cluster, or processes started by hand).

One config runs on one device and on a pod: ``train.distributed: auto`` (the default) calls
``jax.distributed.initialize()`` exactly when the environment describes a job of several processes, before
anything touches the devices, and does nothing on a single machine. What counts as "several processes":

* ``JAX_COORDINATOR_ADDRESS`` set (processes started by hand or by a launcher): ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` give the job size and this process's rank (like torchrun's WORLD_SIZE / RANK);
* SLURM with ``SLURM_NTASKS`` > 1, Open MPI with ``OMPI_COMM_WORLD_SIZE`` > 1, a Cloud TPU VM whose
  ``TPU_WORKER_HOSTNAMES`` lists several hosts: jax's own cluster detection fills in the rest.

``on`` insists (an error if no job is found), ``off`` never joins. On CPU the processes exchange data through
gloo collectives. Afterwards every process builds the same mesh over all devices, loads only its share of the
batch rows (``sftjax.data.pipeline``), and only process 0 writes metrics and exported models.
"""

from __future__ import annotations

import logging
import os

from sftjax.errors import ConfigError

logger = logging.getLogger("sftjax.train.distributed")

MODES = ("auto", "on", "off")


def detected_job() -> str | None:
    """A description of the multi-process job the environment describes, or None on a single process."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
    if "SLURM_JOB_ID" in env and _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} ({env['SLURM_NTASKS']} tasks)"
    if _int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI job of {env['OMPI_COMM_WORLD_SIZE']} processes"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU pod of {len(hosts)} hosts"
    return None


def _int(value: str | None, name: str) -> int:
    if value in (None, ""):
        return 1
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _already_initialized() -> bool:
    import jax

    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is not None:
        return bool(is_initialized())
    from jax._src import distributed  # older jax: no public query

    return distributed.global_state.client is not None


def initialize(mode: str = "auto") -> bool:
    """Join the job per ``mode`` (see the module docstring); True when this process is part of one."""
    if mode not in MODES:
        raise ConfigError(f"train.distributed={mode!r} must be one of {', '.join(MODES)}")
    if mode == "off":
        return False
    if _already_initialized():
        return True
    job = detected_job()
    if job is None:
        if mode == "on":
            raise ConfigError("train.distributed=on but no multi-process job found: set JAX_COORDINATOR_ADDRESS, "
                              "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM / Open MPI / a TPU pod")
        return False
    import jax

    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(name)]
        if missing:
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: every process "
                              "needs the job size and its own rank")
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=_int(os.environ["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES"),
                      process_id=_int(os.environ["JAX_PROCESS_ID"], "JAX_PROCESS_ID"))
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU client reads it
    except Exception:  # noqa: BLE001 - an option this jax does not have: CPU collectives stay unavailable
        pass
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"joining the multi-process job ({job}) failed: {first} (jax.distributed must start "
                          "before anything uses the devices: create the Trainer first in a fresh process)") from None
    logger.info("joined %s as process %d of %d (%d local / %d global devices)", job, jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
