#!/bin/bash
# Submit the whole REDI recipe as a Slurm job chain (each job starts only if the previous succeeded):
#
#   convert   redi-hf-to-megatron   HF base model -> Megatron checkpoint (+ the long-context RoPE edit)
#   sft       redi-train            stage 1 from the converted checkpoint
#   redi      redi-train            stage 2 from the newest SFT checkpoint (INIT_FROM_RUN)
#   export    redi-megatron-to-hf   newest REDI checkpoint -> HF directory   (also the SFT model)
#   eval      redi-eval             vLLM sampling + grading on the paper's benchmarks (EVAL_IMAGE)
#
#   HF_BASE=/models/Qwen2.5-Math-1.5B bash examples/slurm/pipeline.sh
#
# Run from the repository root. sbatch options such as the account and partition come from the usual
# SBATCH_ACCOUNT / SBATCH_PARTITION environment variables. A failed job cancels the jobs that depend on it
# (--kill-on-invalid-dep=yes); fix, and resubmit from that stage with START_AT=sft|redi|export|eval
# (training stages resume from their newest checkpoint). Logs: slurm-redi-STAGE-JOBID.out in the submit dir.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

HF_BASE=${HF_BASE:-}                         # HF Qwen/Qwen2.5-Math-1.5B directory (container path)
SFT_CONFIG=${SFT_CONFIG:-examples/configs/qwen2.5-math-1.5b_sft.yaml}
REDI_CONFIG=${REDI_CONFIG:-examples/configs/qwen2.5-math-1.5b_redi.yaml}
NAME=${NAME:-qwen2.5-math-1.5b}
BASE_CKPT=${BASE_CKPT:-checkpoints/$NAME}    # converted base model
SFT_RUN=${SFT_RUN:-runs/${NAME}_sft}         # run directories (checkpoint.save_dir)
REDI_RUN=${REDI_RUN:-runs/${NAME}_redi}
HF_OUT=${HF_OUT:-hf/$NAME}                   # exported HF models: $HF_OUT/sft, $HF_OUT/redi
EVAL_OUT=${EVAL_OUT:-evals/$NAME}
NODES=${NODES:-1}                            # training nodes (the 7B 4-node recipes: NODES=4)
TP_CONVERT=${TP_CONVERT:-1}                  # largest TP the checkpoint will be trained with
ROPE_OVERRIDE=${ROPE_OVERRIDE-rope_theta=300000 max_position_embeddings=32768}  # empty: no RoPE edit
SFT_OVERRIDES=${SFT_OVERRIDES:-}             # more key=value overrides for the SFT stage (space-separated)
REDI_OVERRIDES=${REDI_OVERRIDES:-}           # ... and for the REDI stage
EVAL_IMAGE=${EVAL_IMAGE:-}                   # a vLLM image with this package installed (see Dockerfile)
EVAL_ARGS=${EVAL_ARGS:---backend vllm --dp 8}
CPU_JOB_ARGS=${CPU_JOB_ARGS:-}               # sbatch args for convert/export (CPU work), e.g. --gpus-per-node=0
START_AT=${START_AT:-convert}                # first stage to submit
STOP_AT=${STOP_AT:-eval}                     # last stage to submit
DRY_RUN=${DRY_RUN:-0}                        # 1: print the sbatch commands, submit nothing

stages=(convert sft redi export eval)
stage_index() {
    local i
    for i in "${!stages[@]}"; do [[ ${stages[$i]} == "$2" ]] && { echo "$i"; return; }; done
    echo "pipeline.sh: $1 must be one of ${stages[*]}, got '$2'" >&2
    exit 2
}
start_index=$(stage_index START_AT "$START_AT")
stop_index=$(stage_index STOP_AT "$STOP_AT")
if (( stop_index < start_index )); then
    echo "pipeline.sh: STOP_AT=$STOP_AT comes before START_AT=$START_AT" >&2
    exit 2
fi
if (( stop_index >= 4 && start_index <= 4 )) && [[ -z $EVAL_IMAGE ]]; then
    echo "pipeline.sh: the eval stage samples with vLLM, which needs its own image: set EVAL_IMAGE" \
         "(see the Dockerfile notes) or STOP_AT=export" >&2
    exit 2
fi
if [[ $START_AT == convert && -z $HF_BASE ]]; then
    echo "pipeline.sh: set HF_BASE to the Hugging Face Qwen2.5-Math directory (or START_AT=sft)" >&2
    exit 2
fi

# submit NAME DEPENDENCY sbatch-args... : prints the job id (DEPENDENCY '' = none)
submit() {
    local name=$1 dep=$2
    shift 2
    local args=(--parsable --job-name="redi-$name")
    [[ -n $dep ]] && args+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
    if [[ $DRY_RUN == 1 ]]; then
        printf 'sbatch' >&2
        printf ' %q' "${args[@]}" "$@" >&2
        echo >&2
        echo "<$name>"
    else
        sbatch "${args[@]}" "$@"
    fi
}
runs() { (( start_index <= $1 && $1 <= stop_index )); }

dep=""
if runs 0; then
    # shellcheck disable=SC2086
    dep=$(submit convert "" $CPU_JOB_ARGS "$here/run.sbatch" \
        "redi-hf-to-megatron --hf $HF_BASE --out $BASE_CKPT --tp $TP_CONVERT${ROPE_OVERRIDE:+ --override $ROPE_OVERRIDE}")
fi
if runs 1; then
    # shellcheck disable=SC2086
    dep=$(submit sft "$dep" --nodes="$NODES" "$here/train.sbatch" "$SFT_CONFIG" \
        "checkpoint.init_from=$BASE_CKPT" "checkpoint.save_dir=$SFT_RUN" $SFT_OVERRIDES)
fi
sft_dep=$dep
if runs 2; then
    # shellcheck disable=SC2086
    dep=$(submit redi "$dep" --nodes="$NODES" --export=ALL,INIT_FROM_RUN="$SFT_RUN" \
        "$here/train.sbatch" "$REDI_CONFIG" "checkpoint.save_dir=$REDI_RUN" $REDI_OVERRIDES)
fi
if runs 3; then
    export_cmd='redi-megatron-to-hf --megatron "$(latest_ckpt %s)" --out %s --dtype bf16 --overwrite'
    # shellcheck disable=SC2059,SC2086
    sft_export=$(submit export-sft "$sft_dep" $CPU_JOB_ARGS "$here/run.sbatch" \
        "$(printf "$export_cmd" "$SFT_RUN" "$HF_OUT/sft")")
    # shellcheck disable=SC2059,SC2086
    dep=$(submit export "$dep" $CPU_JOB_ARGS "$here/run.sbatch" "$(printf "$export_cmd" "$REDI_RUN" "$HF_OUT/redi")")
fi
if runs 4; then
    # the SFT model is evaluated too: wait for its export as well
    [[ -n ${sft_export:-} ]] && dep=${dep:+$dep:}$sft_export
    dep=$(submit eval "$dep" --export=ALL,IMAGE="$EVAL_IMAGE" "$here/run.sbatch" \
        "redi-eval --model $HF_OUT/redi --out $EVAL_OUT/redi $EVAL_ARGS && redi-eval --model $HF_OUT/sft --out $EVAL_OUT/sft $EVAL_ARGS")
fi
echo "pipeline.sh: submitted from stage '$START_AT'; last job $dep (squeue --me to follow)"
