"""Compile Triton IR for an NVIDIA GPU without one, and read the kernels' registers, spills and shared memory.

Run as a script in its own process (it imports only the ``triton`` pip package, never jax, so the two bundled
MLIR/LLVM copies never meet in one process)::

    python pallas_kernels/triton_compile.py DIR [--arch 90]

DIR holds ``<name>.ttir`` files (Triton IR as text) with a ``<name>.json`` beside each
(``{"num_warps": 4, "num_stages": 2}``). For each, ``triton.compile`` runs the full pipeline to a cubin for
``sm_<arch>`` (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas); ``ptxas -v`` on the PTX then reports registers per
thread and spill stores/loads. Results go to ``DIR/results.json``: one entry per kernel with ``n_regs``,
``spill_stores``, ``spill_loads`` (bytes), ``shared`` (bytes of shared memory), ``stack`` (bytes of stack
frame), or ``error`` (first line) where compiling failed.

XLA compiles the same IR with its own copy of Triton on the GPU machine; use the Triton version that machine's
jaxlib bundles (3.6.0 for jax 0.11.2) so the numbers describe what will run.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas(triton_module) -> str:
    path = pathlib.Path(triton_module.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.is_file():
        raise FileNotFoundError(f"ptxas not found at {path} (the triton wheel ships it)")
    return str(path)


def compile_one(ttir_path: pathlib.Path, options: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(str(ttir_path), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": options["num_warps"], "num_stages": options["num_stages"]})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = pathlib.Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        report = subprocess.run([_ptxas(triton), "-v", f"--gpu-name=sm_{arch}{suffix}", str(ptx), "-o",
                                 str(pathlib.Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    spills, regs = _PTXAS_LINE.search(text), _REGS.search(text)
    if spills is None or regs is None:
        raise RuntimeError(f"could not read ptxas -v output: {text.strip()[:200]}")
    return dict(n_regs=int(regs.group(1)), stack=int(spills.group(1)), spill_stores=int(spills.group(2)),
                spill_loads=int(spills.group(3)), shared=int(kernel.metadata.shared), triton=triton.__version__)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    arch = 90
    if "--arch" in args:
        index = args.index("--arch")
        arch = int(args[index + 1])
        del args[index:index + 2]
    folder = pathlib.Path(args[0])
    results = {}
    for ttir in sorted(folder.glob("*.ttir")):
        options = json.loads(ttir.with_suffix(".json").read_text())
        try:
            results[ttir.stem] = compile_one(ttir, options, arch)
        except Exception as error:  # one kernel failing must not hide the others
            message = str(error).strip().splitlines()
            results[ttir.stem] = dict(error=f"{type(error).__name__}: {message[0] if message else ''}"[:300])
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cache-"))
    sys.exit(main())
