# Helpers shared by the redi-megatron Slurm scripts (sourced on the host and inside the container).

# The newest complete checkpoint of a training run directory (checkpoint.save_dir):
# <run>/checkpoints/step_NNNNNNN/ with its redi_meta.json (written last, so its presence marks a
# finished save). Prints nothing and fails if there is none.
latest_ckpt() {
    local run=$1 best="" d
    for d in "$run"/checkpoints/step_[0-9][0-9][0-9][0-9][0-9][0-9][0-9]; do
        [[ -f "$d/redi_meta.json" ]] && best=$d
    done
    if [[ -z "$best" ]]; then
        echo "latest_ckpt: no complete checkpoint under $run/checkpoints" >&2
        return 1
    fi
    echo "$best"
}

# Runtime settings for NCCL / PyTorch / Megatron (override any of them in the environment).
redi_runtime_env() {
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP/SP overlap needs 1
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the job
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # compute nodes read local model/tokenizer directories
}

# The rendezvous address: the first node of the allocation as an IP address (a node *name* need not
# resolve on the other nodes, or may resolve to another interface). Override with MASTER_ADDR.
first_node_addr() {
    local node addr
    node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(getent ahostsv4 "$node" 2>/dev/null | awk '{print $1; exit}')
    if [[ -z "$addr" && "$node" == "$(hostname -s)" ]]; then
        addr=$(hostname -I 2>/dev/null | awk '{print $1}')
    fi
    echo "${addr:-$node}"
}

# srun arguments that start the task in the chosen container mode (CONTAINER):
#   pyxis      (default) pyxis/enroot: --container-image/--container-mounts/--container-workdir (NGC images)
#   none       no container: the site's Python environment (PYTHON_ENV: a venv or conda env to activate),
#              the task runs in REPO_DIR
#   apptainer  apptainer exec IMAGE (a .sif); REPO_DIR bound at CONTAINER_DIR
# Fills the arrays SRUN_CONTAINER (srun options) and TASK_PREFIX (command prefix); sets TASK_DIR (the
# repository as the task sees it).
container_launch() {
    SRUN_CONTAINER=()
    TASK_PREFIX=()
    case "${CONTAINER:-pyxis}" in
        pyxis)
            TASK_DIR=$CONTAINER_DIR
            SRUN_CONTAINER=(--container-image="$IMAGE" --container-mounts="$MOUNTS"
                            --container-workdir="$CONTAINER_DIR" --no-container-mount-home) ;;
        none)
            TASK_DIR=$REPO_DIR
            SRUN_CONTAINER=(--chdir="$REPO_DIR")
            if [[ -n "${PYTHON_ENV:-}" ]]; then
                TASK_PREFIX=(env "PATH=$PYTHON_ENV/bin:$PATH" "VIRTUAL_ENV=$PYTHON_ENV")
            fi ;;
        apptainer)
            TASK_DIR=$CONTAINER_DIR
            TASK_PREFIX=(apptainer exec --nv --bind "$MOUNTS" --pwd "$CONTAINER_DIR" "$IMAGE") ;;
        *)
            echo "CONTAINER must be pyxis, none or apptainer, got '${CONTAINER}'" >&2
            return 2 ;;
    esac
}
