#!/usr/bin/env bash
# The staged GPU benchmark (benchmarks/gpu/): every stage in its own capped process, JSON lines appended under
# OUT_DIR as results arrive. Uses the machine's python3 as it is (no installs: the GPU machine has no network).
#
#   scripts/bench_gpu.sh OUT_DIR [--dry-run] [--stages env,correctness,kernels|train,torch] [--budget-s S]
#
# On a lent GPU, two calls of about 5 minutes each (BENCHMARKS.md, "GPU runs"):
#   scripts/bench_gpu.sh "$OUT" --stages env,correctness,kernels --budget-s 290
#   scripts/bench_gpu.sh "$OUT" --stages train,torch --budget-s 290
# --dry-run: the same stages on the CPU with tiny shapes (the test suite runs it).
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: scripts/bench_gpu.sh OUT_DIR [--dry-run] [--stages LIST] [--budget-s S]" >&2
  exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$1"
shift
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "bench_gpu: $python not found (set PYTHON=...)" >&2; exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The driver stops itself within its budget; this outer cap (budget + 30 s, else 600 s on the GPU and an hour
# for the dry run) is a last guard.
limit=600
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--dry-run" ]; then limit=3600; fi
done
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--budget-s" ]; then j=$((i + 1)); budget="${!j:-0}"; limit=$(( ${budget%.*} + 30 )); fi
done
cd "$repo"
exec timeout --signal=TERM --kill-after=10 "$limit" "$python" -m benchmarks.gpu.run "$out" --python "$python" "$@"
