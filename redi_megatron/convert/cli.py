"""The converters' command lines, parsed before torch or Megatron is imported: ``--help`` and argument errors
come back in a fraction of a second (importing torch alone takes 2-9 s). The console scripts, the
``checkpoint_tools/`` wrappers and ``python -m redi_megatron.convert.<tool>`` all start here; each tool's
work is its module's ``run(args)``, imported only once the arguments parse. Standard library only.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

HF_TO_MEGATRON = "redi-hf-to-megatron: a Hugging Face model directory -> a redi-megatron model checkpoint."
MEGATRON_TO_HF = ("redi-megatron-to-hf: a redi-megatron model checkpoint (any TP/PP layout) -> a Hugging Face "
                  "directory.")
VERIFY_PARITY = ("redi-verify-parity: run an HF model and a redi-megatron checkpoint on the same prompts and "
                 "compare.")


def hf_to_megatron_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redi-hf-to-megatron", description=HF_TO_MEGATRON)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate and pad for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate for")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="ModelConfig fields to change, e.g. rope_theta=300000 max_position_embeddings=32768")
    p.add_argument("--dtype", default=None, help="weights dtype (default: config.json's): bf16, fp16, fp32")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def megatron_to_hf_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redi-megatron-to-hf", description=MEGATRON_TO_HF)
    p.add_argument("--megatron", required=True,
                   help="redi-megatron checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="HF directory to create")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export even if weights hold NaN/inf (by default that is refused: a diverged run)")
    p.add_argument("--trust-unverified", action="store_true",
                   help="the source is trusted: load it without a manifest (older versions) and without the unpickling "
                        "limits; checkpoints are code")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def verify_parity_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redi-verify-parity", description=VERIFY_PARITY)
    p.add_argument("--hf", default=None,
                   help="HF model directory (required without --vllm; with it: an export to check as written)")
    p.add_argument("--megatron", required=True, help="redi-megatron checkpoint directory")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: built-in)")
    p.add_argument("--dtype", default="fp32", help="compute dtype for both models (default fp32)")
    p.add_argument("--max-abs-diff", type=float, default=1e-3, help="tolerance on |logit difference|")
    p.add_argument("--max-kl", type=float, default=1e-5, help="tolerance on per-token KL(HF||Megatron)")
    g = p.add_argument_group("three engines (--vllm)")
    g.add_argument("--vllm", action="store_true",
                   help="compare token log-probs of Megatron (the trainer's), transformers and vLLM on the "
                        "export of --megatron, and HF/vLLM greedy continuations")
    g.add_argument("--max-logprob-diff", type=float, default=1e-4,
                   help="tolerance on |log-prob difference| between any two engines (default 1e-4, for fp32; "
                        "bf16 needs about 1e-1)")
    g.add_argument("--greedy-tokens", type=int, default=16, help="greedy tokens compared per prompt (0: none)")
    g.add_argument("--vllm-tp", type=int, default=1, help="vLLM tensor-parallel size")
    return p


def hf_to_megatron(argv: Optional[Sequence[str]] = None) -> int:
    """``redi-hf-to-megatron``."""
    args = hf_to_megatron_parser().parse_args(argv)
    from redi_megatron.convert.hf_to_megatron import run

    return run(args)


def megatron_to_hf(argv: Optional[Sequence[str]] = None) -> int:
    """``redi-megatron-to-hf``."""
    args = megatron_to_hf_parser().parse_args(argv)
    from redi_megatron.convert.megatron_to_hf import run

    return run(args)


def verify_parity(argv: Optional[Sequence[str]] = None) -> int:
    """``redi-verify-parity``."""
    args = verify_parity_parser().parse_args(argv)
    from redi_megatron.convert.verify_parity import run

    return run(args)
