#!/usr/bin/env bash
# Creates (idempotently) .venv-accel/: Python 3.12 with the jax the accelerator machines run (jax[tpu], libtpu
# included, so TPU programs can be AOT-compiled on a CPU machine), the Triton compiler of the GPU machines (to
# read registers and spills of the Pallas-Triton kernels for sm_90), and only what sftjax's model, loss, train
# step and plan import. Versions are pinned in constraints/accel-py312.txt.
#
#   scripts/accel_env.sh              create or update the env (a no-op when it already matches the pins)
#   scripts/accel_env.sh --refreeze   re-resolve the top-level list and rewrite the pins
#
# Python 3.12 is taken from $ACCEL_PYTHON, else `python3.12` on PATH, else pyenv's newest 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${ACCEL_VENV:-.venv-accel}
PINS=constraints/accel-py312.txt
JAX_VERSION=0.11.2
TOP_LEVEL=("jax[tpu]==$JAX_VERSION" flax optax numpy pyyaml pytest "triton==3.6.0" "transformers==5.24.0")

find_python() {
  if [ -n "${ACCEL_PYTHON:-}" ]; then echo "$ACCEL_PYTHON"; return; fi
  if python3.12 -c '' >/dev/null 2>&1; then command -v python3.12; return; fi
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  local found
  found=$(ls -d "$root"/versions/3.12.* 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$found" ] && [ -x "$found/bin/python" ]; then echo "$found/bin/python"; return; fi
  echo "accel_env: no Python 3.12 found (set ACCEL_PYTHON, or install it: pyenv install 3.12)" >&2
  exit 1
}

refreeze=0
[ "${1:-}" = "--refreeze" ] && refreeze=1

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  rm -rf "$VENV"
  "$(find_python)" -m venv "$VENV"
fi
stamp="$VENV/.pins.sha256"
want=$(sha256sum "$PINS" | cut -d' ' -f1)
if [ $refreeze = 1 ]; then
  "$VENV/bin/python" -m pip install -q "${TOP_LEVEL[@]}"
  { sed -n '1,3p' "$PINS"; "$VENV/bin/python" -m pip freeze --exclude-editable; } > "$PINS.new"
  mv "$PINS.new" "$PINS"
  want=$(sha256sum "$PINS" | cut -d' ' -f1)
elif [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q -c "$PINS" "${TOP_LEVEL[@]}"
fi
"$VENV/bin/python" -m pip install -q --no-deps -e . >/dev/null  # the sftjax command, this checkout
echo "$want" > "$stamp"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print("accel env:", ", ".join(f"{p} {m.version(p)}" for p in ("jax", "jaxlib", "libtpu", "flax", "optax", "triton")))
PY
echo "accel env ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1) on disk ($VENV)"
