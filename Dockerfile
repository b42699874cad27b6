# syntax=docker/dockerfile:1
# redi-megatron training image: an NGC PyTorch release (CUDA, cuDNN, NCCL, torch, Transformer Engine,
# apex) + megatron-core 0.16.x + this package, without replacing any of the container's GPU stack.
#
#   docker build -t redi-megatron:latest .                        # from the repository root
#   docker build --build-arg NGC_PYTORCH_TAG=25.12-py3 -t redi-megatron:25.12 .
#   enroot import -o redi-megatron.sqsh dockerd://redi-megatron:latest   # image file for Slurm/pyxis
#
# Choosing NGC_PYTORCH_TAG: megatron-core 0.16.1 is tested against Transformer Engine 2.9-2.11 (its
# [dev] extra pins transformer-engine>=2.9,<2.12) and NVIDIA builds each Megatron release on the
# previous month's NGC container. Pick the release whose release notes list a TE in that range; the
# build prints the versions it ended up with and warns when TE is outside it (heredoc RUN steps need
# BuildKit, the default builder of current Docker). The default below was
# not built here (the development machine has no GPU registry access): check it before relying on it.
#
# How the GPU stack is kept: NGC images pin their packages through PIP_CONSTRAINT; we replace that with
# our own constraints file holding the exact versions of torch, TE, apex, numpy, triton and the NVIDIA
# wheels, so pip fails instead of swapping them. This package goes in with --no-deps and only the
# missing pure-python dependencies are installed. FP8 training (train.fp8=delayed|current) needs the
# image's TE; without TE the trainer refuses FP8 with an error.
#
# Evaluation with vLLM is NOT in this image: vllm pins its own torch (and CUDA) build, which would
# replace the container's torch and break TE/apex. Use a separate image for redi-eval, e.g.
#   FROM vllm/vllm-openai:<tag>
#   COPY . /workspace/redi-megatron
#   RUN pip install --no-deps -e /workspace/redi-megatron \
#    && pip install "math-verify==0.9.0" sympy pylatexenc datasets matplotlib
# (or a venv with `pip install vllm` next to this one) and pass it to examples/slurm/pipeline.sh as
# EVAL_IMAGE. redi-eval's HF backend works in this image, but is far slower for 30k-token samples.
ARG NGC_PYTORCH_TAG=25.11-py3
FROM nvcr.io/nvidia/pytorch:${NGC_PYTORCH_TAG}

ARG MEGATRON_CORE_VERSION=0.16.1

ENV PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /workspace/redi-megatron

# 1. Freeze the GPU stack the image ships (exact versions) as constraints for every later pip call.
RUN pip freeze | grep -iE '^(torch|torchvision|torchaudio|transformer[-_]engine[a-z0-9_-]*|apex|flash[-_]attn|triton|pytorch[-_]triton|numpy|nvidia-[a-z0-9-]+)==' \
        > /etc/redi-keep.txt \
 && echo "kept:" && cat /etc/redi-keep.txt \
 && python -c "import torch; print(torch.__version__)" > /etc/redi-torch-version

# 2. megatron-core 0.16.x unless the image already has it (its own deps are torch, numpy, packaging).
RUN python - <<'EOF' || pip install --no-deps -c /etc/redi-keep.txt "megatron-core==${MEGATRON_CORE_VERSION}"
import importlib.metadata as md, sys
try:
    v = md.version("megatron-core")
except md.PackageNotFoundError:
    sys.exit(1)
print("image megatron-core", v)
sys.exit(0 if v.startswith("0.16.") else 1)
EOF

# 3. The pure-python dependencies of setup.py (pip skips those already present). psutil: needed by
#    dist_checkpointing's async save but not declared by megatron-core.
RUN pip install -c /etc/redi-keep.txt \
        packaging psutil "transformers>=4.45" "datasets>=3.0" safetensors pyyaml tqdm \
        "math-verify==0.9.0" sympy pylatexenc matplotlib tensorboard

# 4. This package, without dependencies (they are all there now).
COPY setup.py README.md ./
COPY redi_megatron ./redi_megatron
COPY examples ./examples
RUN pip install --no-deps -e .

# 5. Check: torch untouched, TE importable and in megatron-core's tested range, the package imports.
RUN python - <<'EOF'
import importlib.metadata as md
import torch
expected = open("/etc/redi-torch-version").read().strip()
assert torch.__version__ == expected, f"torch changed from {expected} to {torch.__version__}"
import transformer_engine  # noqa: F401  (FP8 and the TE layer specs need it)
from packaging.version import Version
try:
    te = md.version("transformer-engine")
except md.PackageNotFoundError:  # a source build without dist metadata
    te = transformer_engine.__version__
mcore = md.version("megatron-core")
print(f"torch {torch.__version__} | transformer-engine {te} | megatron-core {mcore}")
if not Version("2.9") <= Version(Version(te).base_version) < Version("2.12"):
    print(f"WARNING: transformer-engine {te} is outside megatron-core 0.16.1's tested range [2.9, 2.12)")
import redi_megatron.training.cli, redi_megatron.eval.cli, redi_megatron.convert.hf_to_megatron  # noqa: E401,F401
print("redi-megatron installed")
EOF
