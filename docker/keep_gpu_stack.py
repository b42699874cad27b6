"""Write the constraints that keep an NGC image's GPU stack (torch, TE, apex, ...) exactly as shipped.

Reads installed distributions through importlib.metadata, not ``pip freeze``: NGC installs torch, TE and
apex from local builds, which ``pip freeze`` prints as ``torch @ file:///...`` with no ``==``; a grep for
``==`` silently dropped exactly those packages, leaving them unconstrained. Fails (exit 1) when torch is
not installed, so a broken base cannot build an image that then swaps torch.

Usage: python keep_gpu_stack.py OUT_FILE
"""
import importlib.metadata as md
import re
import sys

KEEP = re.compile(r"^(torch|torchvision|torchaudio|transformer-engine[a-z0-9-]*|apex|flash-attn[a-z0-9-]*|triton|"
                  r"pytorch-triton[a-z0-9-]*|numpy|nvidia-[a-z0-9-]+)$")


def canonical(name: str) -> str:
    """PEP 503 normalised name (``Transformer_Engine`` -> ``transformer-engine``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def kept_versions() -> dict[str, str]:
    """Canonical name -> installed version for every GPU-stack distribution on sys.path."""
    found: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and KEEP.match(canonical(name)):
            found.setdefault(canonical(name), dist.version)
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: keep_gpu_stack.py OUT_FILE", file=sys.stderr)
        return 2
    found = kept_versions()
    if "torch" not in found:
        print("keep_gpu_stack: torch is not installed in this image; refusing to build", file=sys.stderr)
        return 1
    lines = [f"{n}=={v}" for n, v in sorted(found.items())]
    with open(argv[0], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("kept (pip may not change these):", *lines, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
