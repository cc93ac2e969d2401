"""Lowering the Pallas GPU kernels for an NVIDIA GPU on a machine without one, and reading their registers.

How (jax 0.11): ``jax.jit(f).trace(*abstract_args).lower(lowering_platforms=("cuda",))`` lowers for CUDA from a
CPU jaxlib. Pallas's Triton lowering asks for the GPU's compute capability; without a device it takes it from
the abstract device of the current abstract mesh, so the lowering runs inside
``jax.sharding.use_abstract_mesh(AbstractMesh(..., abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB
HBM3", platform="gpu")))`` (jax maps the device kind to sm_90). jax 0.10 needs no context: without a GPU it
lowers for sm_90. Lowering runs every trace-time check of the kernels (Triton's power-of-two tile rule, block
shapes, unsupported primitives) and produces, per ``pallas_call``, a ``__gpu$xla.gpu.triton`` custom call
carrying the kernel's Triton IR (MLIR bytecode) with its ``num_warps`` / ``num_stages``.

:func:`triton_kernels` pulls those kernels out as Triton IR text, and :func:`kernel_registers` compiles them
for sm_90 with the ``triton`` pip package in a separate process (``pallas_kernels/triton_compile.py``) to read
registers per thread, spills and shared memory: what decides whether a tile configuration fits the SM.

Command line (in the accelerator env, ``scripts/accel_env.sh``)::

    python -m pallas_kernels.lowering                  # lower every standard shape, report pass/fail
    python -m pallas_kernels.lowering --registers      # ... and registers/spills of each kernel
    python -m pallas_kernels.lowering --sweep --json benchmarks/results/gpu_lowering_sm90.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

DEFAULT_DEVICE_KIND = "NVIDIA H100 80GB HBM3"  # sm_90
TRITON_TARGET = "__gpu$xla.gpu.triton"
# Shared memory one thread block may use on sm_90 (227 KiB).
SM90_MAX_SHARED_BYTES = 227 * 1024


@contextlib.contextmanager
def gpu_lowering_context(device_kind: str = DEFAULT_DEVICE_KIND):
    """Within it, Pallas-Triton kernels lower for ``device_kind``'s compute capability without a GPU."""
    import jax
    from jax.sharding import AbstractMesh, AxisType

    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None)
    if abstract_device is None or use_abstract_mesh is None:  # older jax: lowers for sm_90 without a device
        yield
        return
    device = abstract_device(device_kind=device_kind, num_cores=None, platform="gpu")
    mesh = AbstractMesh((1,), ("gpu",), axis_types=(AxisType.Auto,), abstract_device=device)
    with use_abstract_mesh(mesh):
        yield


def lower_for_gpu(fn: Callable, *abstract_args, device_kind: str = DEFAULT_DEVICE_KIND):
    """``jax.jit(fn)`` lowered for CUDA from ShapeDtypeStructs (no device needed); returns jax's Lowered."""
    import jax

    with gpu_lowering_context(device_kind):
        return jax.jit(fn).trace(*abstract_args).lower(lowering_platforms=("cuda",))


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One ``pallas_call`` of a lowered program: its name, Triton IR (text), launch parameters and grid."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def triton_kernels(lowered) -> list[TritonKernel]:
    """The Triton kernels of a program lowered for CUDA, in program order, each distinct kernel once."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton.lowering import _new_ir_context

    found, seen = [], set()

    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for inner in block.operations:
                    op = inner.operation
                    if op.name == "stablehlo.custom_call" and \
                            ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_TARGET:
                        config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                        found.append({key: config[key] for key in ("name", "ir", "num_warps", "num_stages",
                                                                    "grid_x", "grid_y", "grid_z")})
                    walk(op)

    walk(lowered.compiler_ir("stablehlo").operation)
    kernels = []
    for entry in found:
        with _new_ir_context():
            text = ir.Module.parse(ir.StringAttr(entry["ir"]).value_bytes).operation.get_asm(
                enable_debug_info=False)
        as_int = lambda attr: ir.IntegerAttr(attr).value  # noqa: E731
        kernel = TritonKernel(ir.StringAttr(entry["name"]).value, text, as_int(entry["num_warps"]),
                              as_int(entry["num_stages"]),
                              (as_int(entry["grid_x"]), as_int(entry["grid_y"]), as_int(entry["grid_z"])))
        key = (kernel.name, kernel.ttir, kernel.num_warps, kernel.num_stages)
        if key not in seen:
            seen.add(key)
            kernels.append(kernel)
    return kernels


def kernel_registers(kernels: list[TritonKernel], *, arch: int = 90, python: str | None = None,
                     timeout: float = 600) -> list[dict]:
    """Compile ``kernels`` for ``sm_<arch>`` with the triton pip package (own process) and return, per kernel,
    ``n_regs``, ``spill_stores``, ``spill_loads``, ``stack``, ``shared`` (bytes), or ``error``."""
    worker = pathlib.Path(__file__).with_name("triton_compile.py")
    with tempfile.TemporaryDirectory(prefix="sftjax-ttir-") as folder:
        for index, kernel in enumerate(kernels):
            stem = pathlib.Path(folder) / f"k{index:03d}"
            stem.with_suffix(".ttir").write_text(kernel.ttir)
            stem.with_suffix(".json").write_text(json.dumps(dict(num_warps=kernel.num_warps,
                                                                 num_stages=kernel.num_stages)))
        env = dict(os.environ, TRITON_CACHE_DIR=str(pathlib.Path(folder) / "cache"))
        done = subprocess.run([python or sys.executable, str(worker), folder, "--arch", str(arch)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        results_path = pathlib.Path(folder) / "results.json"
        if done.returncode != 0 or not results_path.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"triton compile worker failed (is the triton package installed?): {tail[0]}")
        results = json.loads(results_path.read_text())
    return [dict(name=k.name, num_warps=k.num_warps, num_stages=k.num_stages, **results[f"k{i:03d}"])
            for i, k in enumerate(kernels)]


@dataclasses.dataclass(frozen=True)
class Case:
    """One program to lower: ``fn(*args)`` with abstract args; ``label`` names the shape."""

    op: str
    label: str
    fn: Callable
    args: tuple
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def attention_case(head_dim: int, q_heads: int, kv_heads: int, *, length: int = 2048, batch: int = 1,
                   backward: bool = True, block_sizes=None, dtype: str = "bfloat16", **options) -> Case:
    """Attention through ``pallas_gpu`` at [batch, length, heads, head_dim]; forward only or forward+backward."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.attention.pallas_gpu import attention_pallas_gpu

    kernel = functools.partial(attention_pallas_gpu, block_sizes=block_sizes, **options)
    q = jax.ShapeDtypeStruct((batch, length, q_heads, head_dim), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    if backward:
        def fn(q, k, v, seg):
            return jax.grad(lambda q, k, v: kernel(q, k, v, seg).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    else:
        fn = kernel
    extra = "".join(f" {key}={value}" for key, value in options.items())
    label = f"attention D={head_dim} {q_heads}q/{kv_heads}kv L={length} {'fwd+bwd' if backward else 'fwd'}{extra}"
    return Case("attention", label, fn, (q, kv, kv, seg), dict(head_dim=head_dim, q_heads=q_heads,
                                                               kv_heads=kv_heads, length=length,
                                                               backward=backward, **options))


def cross_entropy_case(vocab: int, *, hidden: int = 4096, tokens: int = 8192, block_sizes=None,
                       dtype: str = "bfloat16", **options) -> Case:
    """The Pallas GPU (row kernels) fused cross-entropy at [tokens, hidden] x [hidden, vocab], forward+backward."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.cross_entropy.pallas_rows import fused_linear_cross_entropy_pallas

    def fn(h, w, targets, mask):
        def loss(h, w):
            return fused_linear_cross_entropy_pallas(h, w, targets, mask, platform="gpu", block_sizes=block_sizes,
                                                     **options).loss_sum
        return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

    args = (jax.ShapeDtypeStruct((tokens, hidden), jnp.dtype(dtype)),
            jax.ShapeDtypeStruct((hidden, vocab), jnp.dtype(dtype)),
            jax.ShapeDtypeStruct((tokens,), jnp.int32), jax.ShapeDtypeStruct((tokens,), jnp.int32))
    return Case("cross_entropy", f"cross_entropy V={vocab} T={tokens} D={hidden} fwd+bwd", fn, args,
                dict(vocab=vocab, hidden=hidden, tokens=tokens, **options))


HEAD_DIMS = (64, 96, 128, 256)
GQA = ((32, 8), (8, 1))
VOCABULARIES = (32000, 49152, 128256, 151936, 997)


def standard_cases() -> list[Case]:
    """The shapes the pre-flight checks: head_dim 64/96/128/256 with GQA 32q/8kv and 8q/1kv, forward and
    forward+backward; a Gemma-2-like soft-capped sliding-window layer; the vocabularies of Llama-2 (32000),
    SmolLM2 (49152), Llama-3 (128256), Qwen2.5 (151936) and a small odd one."""
    cases = [attention_case(d, q, kv, backward=backward) for d in HEAD_DIMS for q, kv in GQA
             for backward in (False, True)]
    cases.append(attention_case(256, 8, 4, sliding_window=1024, logit_softcap=50.0))
    cases += [cross_entropy_case(vocab, hidden=1024 if vocab < 2048 else 4096) for vocab in VOCABULARIES]
    return cases


def run_case(case: Case, *, registers: bool = False, device_kind: str = DEFAULT_DEVICE_KIND) -> dict:
    """Lower one case; ``ok`` with its Triton kernels (and their registers), or the first line of the error."""
    start = time.perf_counter()
    result = dict(op=case.op, label=case.label, **case.options)
    try:
        lowered = lower_for_gpu(case.fn, *case.args, device_kind=device_kind)
    except Exception as error:
        message = str(error).strip().splitlines()
        result.update(ok=False, error=f"{type(error).__name__}: {message[0] if message else ''}"[:400])
        return result
    kernels = triton_kernels(lowered)
    result.update(ok=True, lower_s=round(time.perf_counter() - start, 2),
                  kernels=[dict(name=k.name, num_warps=k.num_warps, num_stages=k.num_stages, grid=list(k.grid))
                           for k in kernels])
    if registers:
        result["kernels"] = kernel_registers(kernels)
    return result


def spills(kernel: dict) -> bool:
    return bool(kernel.get("error")) or kernel.get("spill_stores", 0) > 0 or kernel.get("spill_loads", 0) > 0 \
        or kernel.get("shared", 0) > SM90_MAX_SHARED_BYTES


ATTENTION_TILES = ((32, 64), (64, 32), (64, 64), (128, 64), (64, 128), (128, 128))
CE_CONFIGS = tuple((rows, block_v) for rows in (8, 16, 32) for block_v in (512, 1024, 2048))


def sweep(*, warps=(4, 8), stages=(1, 2), head_dims=(64, 128, 256), tiles=ATTENTION_TILES, ce_configs=CE_CONFIGS,
          progress=print) -> list[dict]:
    """Registers and spills of every kernel for every tile / num_warps / num_stages candidate (sm_90)."""
    from pallas_kernels.attention.pallas_gpu import BlockSizes as AttentionBlocks
    from pallas_kernels.cross_entropy.pallas_rows import BlockSizes as RowBlocks

    rows = []
    for head_dim in head_dims:
        for block_q, block_k in tiles:
            for num_warps in warps:
                for num_stages in stages:
                    blocks = AttentionBlocks(block_q, block_k, num_warps, num_stages, block_q, block_k, num_warps,
                                             num_stages, block_q, block_k, num_warps, num_stages)
                    case = attention_case(head_dim, 8, 2, length=1024, block_sizes=blocks)
                    result = run_case(case, registers=True)
                    for kernel in result.get("kernels", []):
                        rows.append(dict(op="attention", head_dim=head_dim, block_q=block_q, block_k=block_k,
                                         **kernel))
                    if not result["ok"]:
                        rows.append(dict(op="attention", head_dim=head_dim, block_q=block_q, block_k=block_k,
                                         num_warps=num_warps, num_stages=num_stages, error=result["error"]))
                    progress(f"attention D={head_dim} {block_q}x{block_k} w{num_warps} s{num_stages}: "
                             + ", ".join(_short(k) for k in result.get("kernels", [])) + result.get("error", ""))
    for block_rows, block_v in ce_configs:
        for num_warps in warps:
            for num_stages in stages:
                blocks = RowBlocks(block_t=1024, block_v=block_v, block_rows=block_rows, num_warps_stats=num_warps,
                                   num_stages_stats=num_stages, num_warps_grad=num_warps, num_stages_grad=num_stages)
                result = run_case(cross_entropy_case(151936, hidden=1024, tokens=2048, block_sizes=blocks),
                                  registers=True)
                for kernel in result.get("kernels", []):
                    rows.append(dict(op="cross_entropy", block_rows=block_rows, block_v=block_v, **kernel))
                progress(f"cross_entropy rows={block_rows} V-chunk={block_v} w{num_warps} s{num_stages}: "
                         + ", ".join(_short(k) for k in result.get("kernels", [])) + result.get("error", ""))
    return rows


# Registers per thread a default may use: below ptxas's cap of 255, so that the Triton inside XLA on the GPU
# machine (whose pass pipeline differs a little from the pip package's) has room before it spills.
REGISTER_HEADROOM = 240


def choose_defaults(rows: list[dict]) -> dict:
    """Per (op, head_dim or "-", kernel): the configuration a default should take from a :func:`sweep`.

    Rule: no spills and shared memory within sm_90's 227 KiB; among those, at most ``REGISTER_HEADROOM``
    registers where any configuration allows it; then the largest tile (block_q x block_k, or block_rows x
    block_v), then more pipeline stages, then fewer registers.
    """
    best: dict = {}
    for row in rows:
        if "n_regs" not in row or spills(row):
            continue
        if row["op"] == "attention":
            key, area = (row["op"], row["head_dim"], row["name"]), row["block_q"] * row["block_k"]
        else:
            key, area = (row["op"], "-", row["name"]), row["block_rows"] * row["block_v"]
        rank = (row["n_regs"] <= REGISTER_HEADROOM, area, row["num_stages"], -row["n_regs"])
        if key not in best or rank > best[key][0]:
            best[key] = (rank, row)
    return {" ".join(map(str, key)): row for key, (_, row) in sorted(best.items(), key=lambda item: str(item[0]))}


def _short(kernel: dict) -> str:
    if kernel.get("error"):
        return f"{kernel['name']} ERROR {kernel['error'][:80]}"
    return (f"{kernel['name'].replace('sftjax_', '')} regs={kernel['n_regs']} spill={kernel['spill_stores']}/"
            f"{kernel['spill_loads']} smem={kernel['shared']}")


def _environment() -> dict:
    import platform

    import jax

    info = dict(jax=jax.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    try:
        import importlib.metadata

        info["triton"] = importlib.metadata.version("triton")
    except Exception:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=pathlib.Path(__file__).parent).stdout.strip() or None
    except OSError:
        info["commit"] = None
    try:
        cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        info["cpu"] = cpu[0] if cpu else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pallas_kernels.lowering", description=__doc__.splitlines()[0])
    parser.add_argument("--registers", action="store_true", help="also compile each kernel for sm_90 (triton)")
    parser.add_argument("--sweep", action="store_true", help="registers/spills over tile and launch candidates")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report: dict[str, Any] = dict(environment=_environment(), target=DEFAULT_DEVICE_KIND + " (sm_90)")
    failed = 0
    if args.sweep:
        report["sweep"] = sweep()
    else:
        report["cases"] = []
        for case in standard_cases():
            result = run_case(case, registers=args.registers)
            report["cases"].append(result)
            status = "PASS" if result["ok"] else "FAIL"
            failed += not result["ok"]
            detail = result.get("error") or ", ".join(_short(k) if "n_regs" in k or "error" in k else k["name"]
                                                     for k in result["kernels"])
            print(f"{status}  {case.label}  {detail}", flush=True)
        print(f"{len(report['cases']) - failed} passed, {failed} failed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
