# Sourced on every worker of a Cloud TPU VM slice (scripts/launch_tpu_pod.sh does it before `sftjax train`):
# describes the multi-host job to `train.distributed: auto` through JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
# and JAX_PROCESS_ID, read from the VM's metadata the way jax's own TPU cluster detection reads them: the workers
# are the entries of `worker-network-endpoints` (a hostname, or name:id:ip), the coordinator is the first one,
# and this worker's rank is `agent-worker-number`. A single-host slice exports nothing (one process, no job).
# Variables already set are left alone. Set SFTJAX_METADATA_URL to read another metadata server (tests).

_sftjax_metadata() {
  curl -sf -H "Metadata-Flavor: Google" \
    "${SFTJAX_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}/$1"
}

if [ -z "${JAX_COORDINATOR_ADDRESS:-}" ]; then
  if _sftjax_endpoints=$(_sftjax_metadata worker-network-endpoints) &&
     _sftjax_rank=$(_sftjax_metadata agent-worker-number); then
    _sftjax_first=${_sftjax_endpoints%%,*}
    _sftjax_count=$(printf '%s\n' "$_sftjax_endpoints" | tr ',' '\n' | grep -c . || true)
    if [ "$_sftjax_count" -gt 1 ]; then
      export JAX_COORDINATOR_ADDRESS="${_sftjax_first##*:}:${SFTJAX_COORDINATOR_PORT:-8476}"
      export JAX_NUM_PROCESSES="$_sftjax_count"
      export JAX_PROCESS_ID="$_sftjax_rank"
      echo "tpu_worker_env: worker $JAX_PROCESS_ID of $JAX_NUM_PROCESSES, coordinator $JAX_COORDINATOR_ADDRESS" >&2
    fi
  else
    echo "tpu_worker_env: no TPU worker metadata here (not a Cloud TPU VM?); running as one process" >&2
  fi
  unset _sftjax_endpoints _sftjax_rank _sftjax_first _sftjax_count
fi
unset -f _sftjax_metadata
