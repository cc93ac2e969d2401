"""PyTorch helpers of the stages: the device, timing with CUDA events, ceilings.

On the GPU machine PyTorch must run on CUDA: ``device()`` raises when CUDA is not available there rather than
quietly measuring the CPU. The dry run uses the CPU on purpose.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.gpu.common import DRY_RUN


def device() -> torch.device:
    if DRY_RUN:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False on the GPU run (torch "
                           f"{torch.__version__}, built for CUDA {torch.version.cuda})")
    return torch.device("cuda")


def synchronize(where: torch.device) -> None:
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def time_calls(fn, where: torch.device, *, repeats: int, calls: int = 1, warmup: int = 1) -> tuple[float, list]:
    """(median ms per call, per-repeat ms per call): CUDA events around ``calls`` calls on a GPU, the host clock
    after a synchronize on the CPU."""
    for _ in range(warmup):
        fn()
    synchronize(where)
    times = []
    for _ in range(repeats):
        if where.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - begin) * 1e3 / calls)
    return statistics.median(times), [round(t, 4) for t in times]


def matmul_ceiling(where: torch.device, size: int, repeats: int) -> dict:
    generator = torch.Generator(device=where).manual_seed(0)
    a, b = (torch.randn(size, size, device=where, dtype=torch.bfloat16, generator=generator) for _ in range(2))
    out = torch.empty(size, size, device=where, dtype=torch.bfloat16)
    median_ms, times = time_calls(lambda: torch.matmul(a, b, out=out), where, repeats=repeats, calls=10, warmup=3)
    flops = 2 * size ** 3
    return {"size": size, "dtype": "bfloat16", "median_ms": median_ms, "tflops": flops / (median_ms * 1e-3) / 1e12,
            "best_tflops": flops / (min(times) * 1e-3) / 1e12}


def copy_ceiling(where: torch.device, nbytes: int, repeats: int) -> dict:
    source = torch.randn(nbytes // 2, device=where, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    median_ms, times = time_calls(lambda: target.copy_(source), where, repeats=repeats, calls=5, warmup=2)
    moved = 2 * nbytes
    return {"bytes": nbytes, "median_ms": median_ms, "tb_per_s": moved / (median_ms * 1e-3) / 1e12,
            "best_tb_per_s": moved / (min(times) * 1e-3) / 1e12}
