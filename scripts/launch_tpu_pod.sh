#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (a pod slice of several hosts, or a single host).
#
#   scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE [options] CONFIG [key.sub=value ...]
#
# Steps, each a `gcloud compute tpus tpu-vm` command on all workers (--worker=all):
#   create   (only with --queued-resource) request the slice as a queued resource and wait until it is ACTIVE
#   copy     scp: a tarball of this checkout (tracked and untracked, not ignored, files) unpacked into --dir;
#            git: clone --repo into --dir (once), fetch --ref and check it out
#   install  a venv in <dir>/.venv with `pip install -e ".[tpu]"`, under the pip constraints file if there is one
#   train    source scripts/tpu_worker_env.sh (the job from the TPU metadata: coordinator, process count, rank),
#            then `sftjax train CONFIG [overrides]` on every worker; `train.distributed: auto` joins the job.
#            Each worker writes <dir>/logs/train-<hostname>.log
#   logs     copy the workers' logs to --logs (default logs/tpu-NAME-<time>)
# --dry-run prints every command instead of running it. CONFIG and its data paths are relative to --dir on the
# workers; checkpoints of a multi-host run must go to storage that every worker sees at the same path
# (checkpoint.directory=...). A training failure still collects the logs, then exits with its status.
set -euo pipefail

PROG=launch_tpu_pod.sh
usage() {
  cat <<'EOF'
usage: scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE [options] CONFIG [key.sub=value ...]

required:
  --tpu NAME               the TPU VM (node) name
  --zone ZONE              its zone, e.g. us-east5-a
  CONFIG                   run config, relative to --dir on the workers (e.g. configs/qwen25_7b_full_tpu_v5p8.yaml)
options:
  --project ID             gcloud project (default: gcloud's configured project)
  --dir DIR                checkout on every worker, relative to the home directory (default: sftjax)
  --copy scp|git           how the code gets there (default: scp)
  --repo URL               git remote to clone (--copy git)
  --ref REF                commit, branch or tag to check out (--copy git; default: this checkout's HEAD commit)
  --python PY              Python >= 3.11 on the workers (default: python3)
  --constraints FILE       pip constraints file, relative to the checkout (default: constraints/tpu.txt if present)
  --env KEY=VALUE          exported before training on every worker (repeatable)
  --detach                 start training in the background on the workers and return (collect logs later
                           with --steps logs)
  --logs DIR               local folder for the collected logs (default: logs/tpu-NAME-<time>)
  --steps LIST             comma-separated subset of create,copy,install,train,logs (default: copy,install,train,
                           plus logs unless --detach, plus create with --queued-resource)
  --queued-resource ID     create the slice as this queued resource first (needs --accelerator-type and
                           --runtime-version; --spot for spot capacity)
  --accelerator-type TYPE  e.g. v5p-16
  --runtime-version V      TPU software version, e.g. v2-alpha-tpuv5
  --spot                   request spot capacity (--queued-resource)
  --dry-run                print every command instead of running it
  -h, --help               this help
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }

tpu="" zone="" project="" dir="sftjax" copy="scp" repo="" ref="" python="python3" constraints="" logs=""
steps="" queued="" accelerator="" runtime="" spot=0 dry=0 detach=0 config=""
envs=() overrides=()
positional=()
value() { [ $# -ge 2 ] && [ -n "$2" ] && [[ $2 != --* ]] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) value "$@"; tpu=$2; shift 2 ;;
    --zone) value "$@"; zone=$2; shift 2 ;;
    --project) value "$@"; project=$2; shift 2 ;;
    --dir) value "$@"; dir=$2; shift 2 ;;
    --copy) value "$@"; copy=$2; shift 2 ;;
    --repo) value "$@"; repo=$2; shift 2 ;;
    --ref) value "$@"; ref=$2; shift 2 ;;
    --python) value "$@"; python=$2; shift 2 ;;
    --constraints) value "$@"; constraints=$2; shift 2 ;;
    --env) value "$@"; [[ $2 == [A-Za-z_]*=* ]] || die "--env $2 must look like KEY=VALUE"; envs+=("$2"); shift 2 ;;
    --logs) value "$@"; logs=$2; shift 2 ;;
    --steps) value "$@"; steps=$2; shift 2 ;;
    --queued-resource) value "$@"; queued=$2; shift 2 ;;
    --accelerator-type) value "$@"; accelerator=$2; shift 2 ;;
    --runtime-version) value "$@"; runtime=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; positional+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) positional+=("$1"); shift ;;
  esac
done
if [ ${#positional[@]} -gt 0 ]; then config=${positional[0]}; overrides=("${positional[@]:1}"); fi

[ -n "$tpu" ] || die "missing --tpu NAME (the TPU VM to train on)"
[ -n "$zone" ] || die "missing --zone ZONE (the TPU's zone, e.g. us-east5-a)"
[ -n "$config" ] || die "missing CONFIG (the run config, e.g. configs/qwen25_7b_full_tpu_v5p8.yaml)"
for item in "${overrides[@]}"; do
  [[ $item == *=* ]] || die "override $item must look like key.sub=value"
done
case "$copy" in scp|git) ;; *) die "--copy $copy must be scp or git" ;; esac
if [ "$copy" = git ] && [ -z "$repo" ]; then die "missing --repo URL (--copy git clones it on every worker)"; fi
if [ -n "$queued" ]; then
  [ -n "$accelerator" ] || die "missing --accelerator-type TYPE (--queued-resource creates the slice)"
  [ -n "$runtime" ] || die "missing --runtime-version V (--queued-resource creates the slice)"
fi
if [ -z "$steps" ]; then
  steps="copy,install,train"
  [ $detach -eq 1 ] || steps+=",logs"  # a detached run's logs are collected later: --steps logs
  [ -n "$queued" ] && steps="create,$steps"
fi
for step in ${steps//,/ }; do
  case "$step" in
    create) [ -n "$queued" ] || die "step create needs --queued-resource ID" ;;
    copy|install|train|logs) ;;
    *) die "--steps: unknown step $step (known: create, copy, install, train, logs)" ;;
  esac
done
wants() { [[ ",$steps," == *",$1,"* ]]; }

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ -z "$constraints" ]; then
  [ -f constraints/tpu.txt ] && constraints=constraints/tpu.txt
elif [[ $constraints == /* || ! -f $constraints ]]; then
  die "--constraints $constraints is not a file of this checkout (give a path relative to the repository root)"
fi
[ -n "$logs" ] || logs="logs/tpu-$tpu-$(date +%Y%m%d-%H%M%S)"
if [ "$copy" = git ] && [ -z "$ref" ]; then
  ref=$(git rev-parse HEAD 2>/dev/null) || die "missing --ref (this is not a git checkout)"
fi

# One shell word, quoted only when it needs it (the printed commands can be pasted into a shell).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" word; for word in "$@"; do out+="${out:+ }$(quote "$word")"; done; printf '%s' "$out"; }
run() {
  if [ $dry -eq 1 ]; then quote_all "$@"; echo; else echo "+ $(quote_all "$@")" >&2; "$@"; fi
}
gflags=(--zone="$zone")
[ -n "$project" ] && gflags+=(--project="$project")
on_workers() { run gcloud compute tpus tpu-vm ssh "$tpu" "${gflags[@]}" --worker=all --command "$1"; }

if wants create; then
  create=(gcloud compute tpus queued-resources create "$queued" --node-id="$tpu" "${gflags[@]}"
          --accelerator-type="$accelerator" --runtime-version="$runtime")
  [ $spot -eq 1 ] && create+=(--spot)
  run "${create[@]}"
  describe=(gcloud compute tpus queued-resources describe "$queued" "${gflags[@]}" --format='value(state.state)')
  if [ $dry -eq 1 ]; then
    echo "# repeated every 30 s until the state is ACTIVE:"
    run "${describe[@]}"
  else
    while state=$("${describe[@]}"); [ "$state" != ACTIVE ]; do
      case "$state" in FAILED|SUSPENDED) echo "$PROG: error: queued resource $queued is $state" >&2; exit 1 ;; esac
      echo "queued resource $queued: ${state:-unknown}; waiting" >&2
      sleep 30
    done
  fi
fi

if wants copy; then
  if [ "$copy" = scp ]; then
    archive="${TMPDIR:-/tmp}/sftjax-$tpu.tar.gz"
    if [ $dry -eq 1 ]; then
      echo "git ls-files -z --cached --others --exclude-standard |" \
        "tar --null --ignore-failed-read -czf $(quote "$archive") -T -"
    else
      echo "+ packing this checkout into $archive" >&2
      git ls-files -z --cached --others --exclude-standard |
        tar --null --ignore-failed-read -czf "$archive" -T -
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu:sftjax-src.tar.gz" "${gflags[@]}" --worker=all
    on_workers "set -e; mkdir -p $(quote "$dir"); tar -xzf sftjax-src.tar.gz -C $(quote "$dir"); rm sftjax-src.tar.gz"
  else
    d=$(quote "$dir")
    on_workers "set -e; [ -d $d/.git ] || git clone --quiet $(quote "$repo") $d;\
 git -C $d fetch --quiet origin $(quote "$ref"); git -C $d checkout --quiet --detach FETCH_HEAD"
  fi
fi

if wants install; then
  pip_constraints=""
  [ -n "$constraints" ] && pip_constraints=" -c $(quote "$constraints")"
  py=$(quote "$python")
  check="$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||\
 { echo \"sftjax needs Python >= 3.11 on the workers; pass --python python3.11 (or newer)\" >&2; exit 1; }"
  on_workers "set -e; cd $(quote "$dir"); $check; [ -d .venv ] || $py -m venv .venv; . .venv/bin/activate;\
 pip install -q --upgrade pip; pip install -q -e '.[tpu]'$pip_constraints"
fi

status=0
if wants train; then
  exports=""
  for item in "${envs[@]}"; do exports+="export $(quote "$item"); "; done
  train=". .venv/bin/activate && . scripts/tpu_worker_env.sh && ${exports}sftjax train"
  train+=" $(quote_all "$config" "${overrides[@]}")"
  log='logs/train-$(hostname).log'  # expanded on each worker
  enter="mkdir -p $(quote "$dir")/logs && cd $(quote "$dir")"
  if [ $detach -eq 1 ]; then
    started='echo "training started on $(hostname)"'
    on_workers "$enter && setsid bash -c $(quote "$train") > $log 2>&1 < /dev/null & $started"
  else
    on_workers "set -o pipefail; $enter && { $train; } 2>&1 | tee $log" || status=$?
  fi
fi

if wants logs; then
  if [ $dry -eq 1 ]; then echo "mkdir -p $(quote "$logs")"; else mkdir -p "$logs"; fi
  collected=0
  run gcloud compute tpus tpu-vm scp "$tpu:$dir/logs/*" "$logs/" "${gflags[@]}" --worker=all || collected=$?
  [ $status -ne 0 ] || status=$collected
  [ $dry -eq 1 ] || echo "logs of every worker in $logs" >&2
fi
exit $status
