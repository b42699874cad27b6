"""``redi-tokenize --config FILE.yaml [key=value ...]``: build the tokenized cache a training run will open.

Reads the same run config as ``redi-train`` and builds exactly the cache entry the trainer looks up
(same data, tokenizer, template, cache directory, and kind from the loss: pairs for REDI/DPO/SimPO,
positives for SFT), in parallel and resumably (``redi_megatron.data.pretokenize``). Run it before a
multi-rank job, on one node: the job then starts in seconds. Exit 2 with one line on bad input.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Optional

from redi_megatron.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redi-tokenize",
        description="Tokenize a run's training data into the shared cache (the one redi-train opens). "
                    "Resumable: rerun after a kill to continue; a finished cache is reused at once.")
    p.add_argument("--config", required=True, help="the run's YAML recipe (see examples/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for redi-train "
                   "(data.train_path=..., data.num_proc=8, data.cache_dir=...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def tokenize_for_run(cfg, progress: bool = True):
    """Build (or reuse) the cache entry the run ``cfg`` will train on; returns the TokenizedDataset."""
    from redi_megatron.data.pretokenize import pretokenize
    from redi_megatron.data.templates import get_template, load_tokenizer
    from redi_megatron.training.components import (
        data_cache_dir,
        dataset_kind,
        resolve_tokenizer_dir,
        validate_data_and_loss,
    )

    spec, _ = validate_data_and_loss(cfg)
    template = get_template(cfg.data.chat_template)
    tokenizer = load_tokenizer(resolve_tokenizer_dir(cfg), template)
    return pretokenize(dataset_kind(spec), cfg.data.train_path, tokenizer, template,
                       data_cache_dir(cfg, announce=progress), cfg.data.num_proc, progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from redi_megatron.config.loader import load_config

    start = time.monotonic()
    try:
        cfg = load_config(args.config, list(args.overrides))
        ds = tokenize_for_run(cfg, progress=not args.quiet)
    except UserError as err:
        print(f"redi-tokenize: error: {err}", file=sys.stderr)
        return 2
    print(f"redi-tokenize: {len(ds)} {ds.kind} samples, {int(ds.offsets[-1])} tokens in {ds.cache_path} "
          f"({time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
