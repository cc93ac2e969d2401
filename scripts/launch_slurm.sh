#!/usr/bin/env bash
# Submit a multi-node GPU training job to SLURM (scripts/slurm_train.sbatch: one task per GPU).
#
#   scripts/launch_slurm.sh --nodes N --gpus-per-node G [options] CONFIG [key.sub=value ...]
#
# Run it on a login node from the repository root, on storage that every node sees. --install first creates the
# venv there (pip install -e ".[gpu]", under the constraints file if there is one). --dry-run prints every command
# (the install, the sbatch line and the srun line the job will run) instead of running it.
set -euo pipefail

PROG=launch_slurm.sh
usage() {
  cat <<'EOF'
usage: scripts/launch_slurm.sh --nodes N --gpus-per-node G [options] CONFIG [key.sub=value ...]

required:
  --nodes N              nodes to allocate
  --gpus-per-node G      GPUs per node; one task (JAX process) runs per GPU
  CONFIG                 run config (e.g. configs/llama31_8b_lora_1gpu.yaml)
options:
  --partition P          SLURM partition
  --account A            SLURM account
  --time T               time limit, e.g. 24:00:00 (default: the script's, 24:00:00)
  --cpus-per-task C      CPU cores per task (default: the script's, 8)
  --job-name NAME        (default: sftjax)
  --venv DIR             virtual environment with sftjax installed (default: .venv)
  --install              create/update the venv first: pip install -e ".[gpu]"
  --python PY            Python >= 3.11 for --install (default: python3)
  --constraints FILE     pip constraints for --install (default: constraints/gpu.txt if present)
  --env KEY=VALUE        exported to every task (repeatable), e.g. XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
  --sbatch-arg ARG       passed to sbatch as is (repeatable), e.g. --sbatch-arg=--exclusive
  --dry-run              print every command instead of running it
  -h, --help             this help
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }

nodes="" gpus="" partition="" account="" time_limit="" cpus="" job_name="sftjax" venv=".venv" install=0
python="python3" constraints="" dry=0
envs=() sbatch_args=() positional=()
value() { [ $# -ge 2 ] && [ -n "$2" ] && [[ $2 != --* || $1 == --sbatch-arg ]] || die "$1 needs a value"; }
count() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 $2 must be a positive integer"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) value "$@"; count "$1" "$2"; nodes=$2; shift 2 ;;
    --gpus-per-node) value "$@"; count "$1" "$2"; gpus=$2; shift 2 ;;
    --partition) value "$@"; partition=$2; shift 2 ;;
    --account) value "$@"; account=$2; shift 2 ;;
    --time) value "$@"; time_limit=$2; shift 2 ;;
    --cpus-per-task) value "$@"; count "$1" "$2"; cpus=$2; shift 2 ;;
    --job-name) value "$@"; job_name=$2; shift 2 ;;
    --venv) value "$@"; venv=$2; shift 2 ;;
    --install) install=1; shift ;;
    --python) value "$@"; python=$2; shift 2 ;;
    --constraints) value "$@"; constraints=$2; shift 2 ;;
    --env) value "$@"; [[ $2 == [A-Za-z_]*=* && $2 != *,* ]] || die "--env $2 must look like KEY=VALUE (no commas)"
           envs+=("$2"); shift 2 ;;
    --sbatch-arg) value "$@"; sbatch_args+=("$2"); shift 2 ;;
    --sbatch-arg=*) sbatch_args+=("${1#--sbatch-arg=}"); shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; positional+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) positional+=("$1"); shift ;;
  esac
done
[ -n "$nodes" ] || die "missing --nodes N (how many nodes to allocate)"
[ -n "$gpus" ] || die "missing --gpus-per-node G (GPUs per node; one task runs per GPU)"
[ ${#positional[@]} -gt 0 ] || die "missing CONFIG (the run config, e.g. configs/llama31_8b_lora_1gpu.yaml)"
for item in "${positional[@]:1}"; do [[ $item == *=* ]] || die "override $item must look like key.sub=value"; done

cd "$(dirname "$0")/.."
if [ -z "$constraints" ]; then
  [ -f constraints/gpu.txt ] && constraints=constraints/gpu.txt
elif [ ! -f "$constraints" ]; then
  die "--constraints $constraints does not exist"
fi

quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" word; for word in "$@"; do out+="${out:+ }$(quote "$word")"; done; printf '%s' "$out"; }
run() {
  if [ $dry -eq 1 ]; then quote_all "$@"; echo; else echo "+ $(quote_all "$@")" >&2; "$@"; fi
}

if [ $install -eq 1 ]; then
  if [ ! -x "$venv/bin/python" ]; then
    if [ $dry -eq 0 ] && ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      die "--python $python is older than 3.11; pass a newer one (--python python3.11)"
    fi
    run "$python" -m venv "$venv"
  fi
  run "$venv/bin/python" -m pip install -q --upgrade pip
  pip_install=("$venv/bin/python" -m pip install -q -e ".[gpu]")
  [ -n "$constraints" ] && pip_install+=(-c "$constraints")
  run "${pip_install[@]}"
fi

export_list="ALL,SFTJAX_VENV=$venv"
for item in "${envs[@]}"; do export_list+=",$item"; done
submit=(sbatch --nodes="$nodes" --gpus-per-node="$gpus" --ntasks-per-node="$gpus" --job-name="$job_name"
        --export="$export_list")
[ -n "$partition" ] && submit+=(--partition="$partition")
[ -n "$account" ] && submit+=(--account="$account")
[ -n "$time_limit" ] && submit+=(--time="$time_limit")
[ -n "$cpus" ] && submit+=(--cpus-per-task="$cpus")
submit+=("${sbatch_args[@]}" scripts/slurm_train.sbatch "${positional[@]}")

run mkdir -p logs
run "${submit[@]}"
if [ $dry -eq 1 ]; then
  echo "# the job then runs, on $nodes node(s) x $gpus GPU(s) = $((nodes * gpus)) tasks:"
  SFTJAX_VENV=$venv bash scripts/slurm_train.sbatch --dry-run "${positional[@]}"
fi
