#!/usr/bin/env bash
# Build the training image with podman on a CPU stand-in for the NGC base, offline, then run a tiny SFT + REDI
# inside it and compare the per-step losses with the same run on the host. Fails (non-zero) when anything
# cannot be built or the losses differ.
#
# Cache (outside the clone, keyed by content): REDI_IMAGE_CACHE (default ~/.cache/redi-megatron-image) holds
# the wheelhouse and the debootstrap root file system; podman's storage keeps the base and stand-in images.
# Only the wheelhouse download and debootstrap use the network (host side); every podman step runs with
# --network=none, as on an air-gapped cluster.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${REDI_IMAGE_CACHE:-$HOME/.cache/redi-megatron-image}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DEB_PKGS=python3,python3-venv,ca-certificates
TAG=ci-$$
IMAGE=localhost/redi-megatron:$TAG
CONTAINER=redi-ci-$$
for b in podman debootstrap; do
    command -v "$b" >/dev/null || { echo ".ci/image: $b missing (bash .ci/system-deps installs it)" >&2; exit 1; }
done
t0=$(date +%s)
stamp() { echo ".ci/image: $1 at $(( $(date +%s) - t0 )) s"; }
cleanup() {
    podman rm -f --ignore "$CONTAINER" >/dev/null 2>&1 || true
    podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
WORK=$(mktemp -d)
trap cleanup EXIT
# podman 4.3 / buildah 1.28 (Debian) as root without systemd: runc (crun where runc is absent) and ulimits
# that fit the machine. Written here, not in /etc.
RUNTIME=${OCI_RUNTIME:-runc}  # Debian package runc (crun fails here: "cgroups in hybrid mode not supported")
printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n[engine]\nruntime = "%s"\n' \
    "$(basename "$RUNTIME")" > "$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf
mkdir -p "$CACHE"
cd "$REPO"

# 1. Wheelhouse (host, network): torch CPU + setuptools/wheel + redi-megatron[image] pinned by constraints.txt.
wkey=$(cat constraints.txt setup.py | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels-$wkey
if [[ ! -d $WHEELS ]]; then
    rm -rf "$WHEELS.tmp"
    python - > "$WORK/requirements.txt" <<'PY'
src = open("setup.py").read()
ns = {}
exec(src[src.index("INSTALL_REQUIRES"):src.index("setup(")], ns)  # setup.py's lists, the one source
print("\n".join(ns["INSTALL_REQUIRES"] + ns["EXTRAS"]["image"] + ["torch==2.13.0", "setuptools", "wheel"]))
PY
    PIP_CONSTRAINT= python -m pip download -q -d "$WHEELS.tmp" --only-binary=:all: -c constraints.txt \
        -r "$WORK/requirements.txt" 2>&1 | tail -5 || true
    [[ -n "$(ls "$WHEELS.tmp" 2>/dev/null)" ]] || { echo ".ci/image: wheelhouse download failed" >&2; exit 1; }
    mv "$WHEELS.tmp" "$WHEELS"
fi
stamp "wheelhouse ready ($(ls "$WHEELS" | wc -l) wheels)"

# 2. Debian base (host, network): debootstrap minbase with the OS packages, imported into podman.
bkey=$(echo "$SUITE $DEB_PKGS" | sha256sum | cut -c1-16)
BASE=localhost/redi-debian-base:$bkey
if ! podman image exists "$BASE"; then
    ROOTFS=$CACHE/rootfs-$bkey
    if [[ ! -f $ROOTFS/.complete ]]; then
        rm -rf "$ROOTFS"
        timeout 900 debootstrap --variant=minbase --include="$DEB_PKGS" "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null
        touch "$ROOTFS/.complete"
    fi
    tar -C "$ROOTFS" --exclude=./.complete -c . | podman import - "$BASE" >/dev/null
fi
stamp "Debian base $BASE"

# 3. The NGC stand-in (offline), keyed by base + wheelhouse + its Containerfile.
skey=$(cat .ci/image/Containerfile.ngc-standin <(echo "$bkey $wkey") | sha256sum | cut -c1-16)
STANDIN=nvcr.io/nvidia/pytorch:standin-$skey
if ! podman image exists "$STANDIN"; then
    timeout 900 podman build -q --network=none --pull=never -v "$WHEELS:/wheels:ro" --build-arg "BASE=$BASE" \
        -f .ci/image/Containerfile.ngc-standin -t "$STANDIN" .ci/image >/dev/null
fi
stamp "NGC stand-in $STANDIN"

# 4. Our Dockerfile on top (offline, wheels only from the mounted wheelhouse). TE is absent: REQUIRE_TE=0.
timeout 900 podman build --network=none --pull=never -v "$WHEELS:/wheels:ro" \
    --build-arg "NGC_PYTORCH_TAG=standin-$skey" --build-arg REQUIRE_TE=0 --build-arg WHEELHOUSE=/wheels \
    -t "$IMAGE" . 2>&1 | grep -E "^(STEP|torch |check_image|kept|  )|rror" || true
podman image exists "$IMAGE" || { echo ".ci/image: the image did not build" >&2; exit 1; }
stamp "image $IMAGE built"

# 5. Tiny SFT + REDI in the image and on the host; the per-step losses must match.
timeout 600 podman run --rm --network=none --name "$CONTAINER" -v "$REPO/.ci/image:/ci:ro" \
    -v "$REPO/examples/configs:/configs:ro" "$IMAGE" python /ci/tiny_chain.py /tmp/chain /configs \
    > "$WORK/image.out" 2> "$WORK/image.err" || { tail -20 "$WORK/image.err" >&2; exit 1; }
PYTHONPATH=$REPO timeout 600 python .ci/image/tiny_chain.py "$WORK/host" examples/configs \
    > "$WORK/host.out" 2> "$WORK/host.err" || { tail -20 "$WORK/host.err" >&2; exit 1; }
python - "$WORK/image.out" "$WORK/host.out" <<'PY'
import json, sys
img, host = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:])
worst = 0.0
for stage in ("sft", "redi"):
    assert len(img[stage]) == len(host[stage]) == 4, (stage, img[stage], host[stage])
    for a, b in zip(img[stage], host[stage]):
        worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
print(f"image losses {img}\nhost losses  {host}\nlargest relative difference {worst:.3g} (allowed 1e-5)")
sys.exit(0 if worst <= 1e-5 else 1)
PY
stamp "done: image trains as the host does"
