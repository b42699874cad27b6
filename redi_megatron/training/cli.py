"""``redi-train --config FILE.yaml [key=value ...]``: one process, or one per GPU under torchrun."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from redi_megatron.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redi-train",
        description="Train SFT / REDI / DPO / SimPO on Megatron-Core. Multi-process: "
                    "torchrun --nproc_per_node N -m redi_megatron.training.cli --config ...",
        epilog="Keys (sections): name, model.*, parallel.*, data.*, loss.name / loss.params.*, optimizer.*, "
               "train.*, checkpoint.*, logging.*; each key, its default and its allowed range (NaN/inf never, "
               "lr >0, epochs >0, keep_last >=0, ...) are listed in docs/training.md ('Configuration "
               "reference', 'Allowed ranges'). Recipes: examples/configs/*.yaml (tiny_cpu_sft.yaml, "
               "tiny_cpu_redi.yaml run on a laptop CPU). Losses: sft, redi, dpo, simpo, ...")
    p.add_argument("--config", required=True, help="YAML recipe (see examples/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=1e-6")
    p.add_argument("--no-resume", action="store_true",
                   help="start fresh even if save_dir holds checkpoints (same as checkpoint.resume=false)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from redi_megatron.config.loader import load_config

    try:
        cfg = load_config(args.config, list(args.overrides))
        if args.no_resume:
            cfg.checkpoint.resume = False
        from redi_megatron.losses.registry import get_loss

        get_loss(cfg.loss.name).make_hparams(cfg.loss.params)  # a loss typo fails before Megatron starts
        from redi_megatron.training.preflight import preflight

        preflight(cfg)  # inputs that do not fit each other, too
        from redi_megatron.training.trainer import train

        summary = train(cfg)
    except UserError as err:  # user errors: one clear line; anything else keeps its traceback
        print(f"redi-train: error: {err}", file=sys.stderr)
        return 2
    finally:
        _teardown()
    if summary.get("preempted") is not None:
        from redi_megatron.training.preemption import EXIT_PREEMPTED

        print(f"redi-train: preempted: saved step {summary['preempted']} ({summary['last_checkpoint']}); "
              f"exit {EXIT_PREEMPTED}, run again (or requeue) to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    if summary["nonfinite"]:
        print(f"redi-train: stopped: {summary['nonfinite']}", file=sys.stderr)
        return 4
    if summary["stopped"]:
        print(f"redi-train: stopped early: {summary['stopped']}", file=sys.stderr)
        return 3
    print(f"redi-train: done, {summary['last_step']}/{summary['total_steps']} steps; "
          f"checkpoint {summary['last_checkpoint']}")
    return 0


def _teardown() -> None:
    # Only when a run got as far as importing Megatron: a config typo must not pay for importing it.
    if "megatron.core" not in sys.modules:
        return
    from redi_megatron.parallel.state import destroy_parallel

    try:
        destroy_parallel()
    except Exception:  # noqa: BLE001 - nothing to tear down after an early config error
        pass


if __name__ == "__main__":
    sys.exit(main())
