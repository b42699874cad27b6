#!/usr/bin/env bash
# The prepared one-shot GPU run of benchmarks/gpu_check.py (docs/gpu.md, "The prepared GPU run").
#
#   bash benchmarks/gpu_check.sh prepare     # HERE, with network: the megatron-core wheel into .whl/ (ignored)
#   bash benchmarks/gpu_check.sh [ARGS...]   # THERE, on one GPU, no network: install the wheel, run the check
#
# The run installs the carried cp312 wheel of megatron-core 0.16.1 with --no-deps (torch, numpy, packaging,
# pyyaml are the machine's own) into /tmp/site, records nvidia-smi, and runs the check under a timeout that
# keeps install + check inside 8 minutes; ARGS go to gpu_check.py (e.g. --quick, --skip-parity).
# Everything lands in $OUT (runs/gpu_check when unset): gpu_check.json (rewritten after every part, so a
# timeout keeps the finished parts), gpu_check_steps.jsonl, gpu_check.log, nvidia-smi.txt.
# Exit status: gpu_check.py's (0 pass, 1 a check failed, 2 no device), 124 on the timeout, 3 no wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEEL_GLOB='.whl/megatron_core-0.16.1-cp312-*.whl'

if [ "${1:-}" = prepare ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl megatron-core==0.16.1 || exit 3
    ls -l $WHEEL_GLOB
    exit 0
fi

OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
shopt -s nullglob
wheels=($WHEEL_GLOB)
if [ ${#wheels[@]} -ne 1 ]; then
    echo "gpu_check.sh: need exactly one $WHEEL_GLOB (run 'bash benchmarks/gpu_check.sh prepare' where pip" \
         "has network, and carry .whl)" >&2
    exit 3
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[0]}" || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c 'import sys, torch, megatron.core as m; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "megatron-core", m.__version__, m.__file__)' 2>&1 | tee "$OUT/gpu_check.log"
timeout -k 10 "${GPU_CHECK_TIMEOUT:-420}" python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 \
    | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
