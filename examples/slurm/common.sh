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
