"""Build-time self-check of the image: fails the build when the package cannot train here.

Checks: torch is the version the base shipped; ``megatron.core`` and its GPT model import (this is what a
broken Transformer Engine breaks); this package's training, eval and converter modules import. Transformer
Engine is checked only when REQUIRE_TE=1 (the default for NGC builds). With REQUIRE_TE=0 (the CPU stand-in
base used by CI, which has no TE) the output says plainly that TE was NOT verified.

Usage: REQUIRE_TE=0|1 python check_image.py TORCH_VERSION_FILE
"""
import importlib.metadata as md
import os
import sys


def check_te() -> str:
    """Import TE and return a one-line verdict; warn outside megatron-core 0.16.1's tested range."""
    import transformer_engine  # noqa: F401  (FP8 and the TE layer specs need it)
    import transformer_engine.pytorch  # noqa: F401
    from packaging.version import Version

    try:
        te = md.version("transformer-engine")
    except md.PackageNotFoundError:  # a source build without dist metadata
        te = transformer_engine.__version__
    line = f"transformer-engine {te}: imported"
    if not Version("2.9") <= Version(Version(te).base_version) < Version("2.12"):
        line += " (WARNING: outside megatron-core 0.16.1's tested range [2.9, 2.12))"
    return line


def main(argv: list[str]) -> int:
    import torch

    expected = open(argv[0], encoding="utf-8").read().strip()
    if torch.__version__ != expected:
        print(f"check_image: torch changed from {expected} to {torch.__version__}", file=sys.stderr)
        return 1
    import megatron.core  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401

    import redi_megatron.convert.hf_to_megatron  # noqa: F401
    import redi_megatron.eval.cli  # noqa: F401
    import redi_megatron.training.cli  # noqa: F401
    import redi_megatron.training.trainer  # noqa: F401

    require_te = os.environ.get("REQUIRE_TE", "1") == "1"
    te = check_te() if require_te else "transformer-engine: NOT VERIFIED (REQUIRE_TE=0; FP8/TE paths untested)"
    print(f"torch {torch.__version__} | megatron-core {md.version('megatron-core')} | {te}")
    print("check_image: megatron.core and redi_megatron import")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
