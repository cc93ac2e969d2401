#!/usr/bin/env bash
# The accelerator pre-flight: in .venv-accel (the jax/libtpu/triton of the accelerator machines, made by
# scripts/accel_env.sh), runs the kernel tests under that jax, lowers the Pallas GPU kernels for sm_90 at real
# shapes (registers and spills of the defaults included), and AOT-compiles the TPU kernels for TPU topologies.
# Every test_*.py under tests/preflight/ is part of it; without libtpu/triton those skip, under CI=true they fail.
#
#   scripts/preflight.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/accel_env.sh
export SFTJAX_PREFLIGHT=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# libtpu looks for a TPU at start-up and logs that there is none; nothing here runs on a TPU.
export TPU_SKIP_MDS_QUERY=1 TF_CPP_MIN_LOG_LEVEL=3
.venv-accel/bin/python -m pytest -q -p no:cacheprovider -rfEsP --durations=10 \
  tests/kernels/test_attention.py tests/kernels/test_cross_entropy.py tests/kernels/test_sharding.py tests/kernels/test_cached_attention.py tests/test_accelerators.py \
  tests/preflight "$@"
echo "pre-flight finished in $(( $(date +%s) - start )) s"
