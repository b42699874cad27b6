#!/usr/bin/env bash
# Install redi-megatron[image] from /opt/redi-megatron with our pins (constraints.txt) and the base's GPU
# stack frozen (/etc/redi-keep.txt). WHEELHOUSE=DIR: offline, wheels only from DIR (air-gapped build).
set -euo pipefail
cd /opt/redi-megatron
args=(-c /etc/redi-keep.txt -c constraints.txt --no-build-isolation)
if [[ -n "${WHEELHOUSE:-}" ]]; then
    args+=(--no-index --find-links "$WHEELHOUSE")
fi
# PIP_CONSTRAINT from the base (NGC's own list) is replaced by ours for this call.
PIP_CONSTRAINT= python -m pip install "${args[@]}" ".[image]"
python -m pip check || { echo "pip_install: pip check found broken requirements" >&2; exit 1; }
