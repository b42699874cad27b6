#!/bin/bash
# Runs inside the container, once per node (srun --ntasks-per-node=1): starts this node's GPU workers
# with torchrun, all nodes meeting at the c10d rendezvous on $MASTER_ADDR:$MASTER_PORT.
#   torchrun_node.sh CONFIG.yaml [key=value ...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"
redi_runtime_env

config=$1
shift
extra=()
if [[ -n "${INIT_FROM_RUN:-}" ]]; then
    # Resolved when the job starts, i.e. after the previous stage has finished writing.
    extra+=("checkpoint.init_from=$(latest_ckpt "$INIT_FROM_RUN")")
fi

# No --node-rank: the c10d rendezvous assigns node ranks itself (it ignores the flag, with a warning).
# torchrun passes TERM on to its workers (the trainer saves a checkpoint on it).
exec torchrun \
    --nnodes="${SLURM_NNODES:-1}" \
    --nproc-per-node="${GPUS_PER_NODE:-8}" \
    --rdzv-id="${SLURM_JOB_ID:-0}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
    -m redi_megatron.training.cli --config "$config" "$@" "${extra[@]}"
