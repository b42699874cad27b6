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
# build prints the versions it ended up with and warns when TE is outside it. The default below was
# not built here (the development machine has no GPU registry access): check it before relying on it.
#
# How the GPU stack is kept: NGC images pin their packages through PIP_CONSTRAINT; we replace that with
# /etc/redi-keep.txt holding the exact versions of torch, TE, apex, numpy, triton and the NVIDIA wheels
# (docker/keep_gpu_stack.py; path-installed builds included), so pip fails instead of swapping them, and
# leave PIP_CONSTRAINT pointing at it in the runtime image. Our dependencies come from setup.py, pinned by
# constraints.txt (one list, no copy here).
#
# Works with plain Docker and with buildah >= 1.28 / podman >= 4.3 (no heredocs, no BuildKit features).
# Air-gapped build (docs/container.md): download the wheels on a host with network, then
#   podman build --network=none -v $PWD/wheelhouse:/wheels:ro --build-arg WHEELHOUSE=/wheels ...
# With WHEELHOUSE set, pip runs with --no-index --find-links and never touches the network.
#
# Code location: the package is installed (not editable) from /opt/redi-megatron, which the Slurm
# scripts' mount (CONTAINER_DIR, default /workspace/redi-megatron) does not cover; the console scripts
# run the baked code, `python -m redi_megatron...` in the mounted repo runs the mounted code.
# FP8 training (train.fp8=delayed|current) needs the image's TE; without TE the trainer refuses FP8
# with an error.
#
# Evaluation with vLLM is NOT in this image: vllm pins its own torch (and CUDA) build, which would
# replace the container's torch and break TE/apex. Use a separate image for redi-eval, e.g.
#   FROM vllm/vllm-openai:<tag>
#   COPY . /opt/redi-megatron
#   RUN pip install -c /opt/redi-megatron/constraints.txt /opt/redi-megatron
# (or a venv with `pip install vllm` next to this one) and pass it to examples/slurm/pipeline.sh as
# EVAL_IMAGE. redi-eval's HF backend works in this image, but is far slower for 30k-token samples.
ARG NGC_PYTORCH_TAG=25.11-py3
FROM nvcr.io/nvidia/pytorch:${NGC_PYTORCH_TAG}

# REQUIRE_TE=0 only for bases without Transformer Engine (CI's CPU stand-in): the self-check then says
# that TE was not verified. WHEELHOUSE: a directory of wheels mounted into the build (air-gapped).
ARG REQUIRE_TE=1
ARG WHEELHOUSE=

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/redi-megatron
COPY docker/keep_gpu_stack.py docker/check_image.py docker/pip_install.sh ./docker/

# 1. Freeze the GPU stack the image ships (exact versions, path installs included) as constraints.
RUN PIP_CONSTRAINT= python docker/keep_gpu_stack.py /etc/redi-keep.txt \
 && python -c "import torch; print(torch.__version__)" > /etc/redi-torch-version

# 2. This package and its dependencies (setup.py's list, pinned by constraints.txt), never moving the
#    GPU stack. Not editable: the code lives in site-packages, outside any Slurm mount.
COPY setup.py README.md constraints.txt ./
COPY redi_megatron ./redi_megatron
COPY examples ./examples
RUN WHEELHOUSE="${WHEELHOUSE}" bash docker/pip_install.sh

# 3. Runtime: later pip calls keep the GPU stack too (NGC's convention), never PIP_CONSTRAINT="".
ENV PIP_CONSTRAINT=/etc/redi-keep.txt

# 4. Self-check: torch untouched, megatron.core imports, TE imported (or reported as NOT VERIFIED).
WORKDIR /
RUN REQUIRE_TE="${REQUIRE_TE}" python /opt/redi-megatron/docker/check_image.py /etc/redi-torch-version
