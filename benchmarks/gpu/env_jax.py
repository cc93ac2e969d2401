"""Stage ``env`` (JAX half): versions, the device and its driver, and XLA's bf16 matmul and memory-copy ceilings."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

from benchmarks.gpu.common import DRY_RUN, Recorder, block_modules


def versions(names) -> dict:
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def nvidia_smi() -> dict:
    """The GPU as the driver reports it (name, driver, memory, clocks), or why not."""
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": "not found"}
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    result = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                            text=True, timeout=20)
    rows = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in result.stdout.splitlines()]
    return {"nvidia_smi": rows or result.stderr.strip()[:300]}


def main() -> int:
    block_modules()
    record = Recorder("env.jsonl", "env")
    record.write({"kind": "host", "status": "ok", "dry_run": DRY_RUN, "argv": sys.argv, "machine": platform.machine(),
                  "cpus": os.cpu_count(), **nvidia_smi(),
                  "environment": {k: v for k, v in os.environ.items()
                                  if k.startswith(("XLA_", "JAX_", "CUDA_", "SFTJAX_BENCH_"))},
                  "versions": versions(["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                                        "flax", "optax", "numpy", "triton", "torch", "transformers", "peft"])})
    import jax

    from benchmarks.gpu import common_jax, shapes

    record.attempt({"kind": "jax_device"}, lambda: {**common_jax.device_record(),
                                                    "devices": [str(d) for d in jax.devices()],
                                                    "backend": jax.default_backend()}, needs_s=1)
    record.attempt({"kind": "ceiling", "framework": "jax", "op": "matmul"},
                   lambda: common_jax.matmul_ceiling(shapes.PLAN.matmul_size, shapes.PLAN.ceiling_repeats), needs_s=5)
    record.attempt({"kind": "ceiling", "framework": "jax", "op": "copy"},
                   lambda: common_jax.copy_ceiling(shapes.PLAN.copy_bytes, shapes.PLAN.ceiling_repeats), needs_s=5)
    return record.finish()


if __name__ == "__main__":
    sys.exit(main())
