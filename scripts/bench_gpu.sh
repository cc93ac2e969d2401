#!/usr/bin/env bash
# One command for the kernel benchmark on a GPU machine: installs the package with CUDA jax into .venv-gpu
# (unless JAX is already importable with a GPU) and writes benchmarks/results/kernels_<device>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  [ -d .venv-gpu ] || python3 -m venv .venv-gpu
  . .venv-gpu/bin/activate
  python -m pip install -q --upgrade pip
  python -m pip install -q "jax[cuda12]" -e .
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec timeout "${BENCH_TIMEOUT:-900}" python benchmarks/bench_kernels.py "$@"
