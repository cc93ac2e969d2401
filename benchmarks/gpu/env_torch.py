"""Stage ``env`` (PyTorch half, its own process): torch's CUDA build, the device, and torch's ceilings."""

from __future__ import annotations

import sys

from benchmarks.gpu.common import Recorder, block_modules


def torch_record() -> dict:
    import torch

    from benchmarks.gpu import common_torch

    where = common_torch.device()
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(where),
              "cuda_available": torch.cuda.is_available()}
    if where.type == "cuda":
        props = torch.cuda.get_device_properties(where)
        record.update(name=props.name, capability=f"{props.major}.{props.minor}",
                      multiprocessors=props.multi_processor_count, memory_bytes=int(props.total_memory),
                      cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
    return record


def main() -> int:
    block_modules()
    record = Recorder("env.jsonl", "env")
    record.attempt({"kind": "torch_device"}, torch_record, needs_s=1)
    from benchmarks.gpu import common_torch, shapes

    where = None
    try:
        where = common_torch.device()
    except RuntimeError as error:
        record.write({"kind": "ceiling", "framework": "torch", "status": "error", "error": str(error)})
    if where is not None:
        plan = shapes.PLAN
        record.attempt({"kind": "ceiling", "framework": "torch", "op": "matmul"},
                       lambda: common_torch.matmul_ceiling(where, plan.matmul_size, plan.ceiling_repeats), needs_s=5)
        record.attempt({"kind": "ceiling", "framework": "torch", "op": "copy"},
                       lambda: common_torch.copy_ceiling(where, plan.copy_bytes, plan.ceiling_repeats), needs_s=5)
    return record.finish()


if __name__ == "__main__":
    sys.exit(main())
