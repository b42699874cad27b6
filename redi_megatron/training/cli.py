"""``redi-train --config FILE.yaml [key=value ...]``: one process, or one per GPU under torchrun."""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Optional

from redi_megatron.console import first_rank, global_rank, say
from redi_megatron.errors import SharedError, UserError


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

    if not first_rank():  # a library's warnings are the same on every rank: rank 0 shows them
        warnings.simplefilter("ignore")
    try:
        cfg = load_config(args.config, list(args.overrides))
        if args.no_resume:
            cfg.checkpoint.resume = False
        _check_loss_name(cfg.loss.name)
        from redi_megatron.losses.registry import get_loss

        get_loss(cfg.loss.name).make_hparams(cfg.loss.params)  # a loss typo fails before Megatron starts
        from redi_megatron.training.preflight import preflight

        preflight(cfg)  # inputs that do not fit each other, too
        from redi_megatron.training.trainer import train

        summary = train(cfg)
    except UserError as err:  # user errors: one clear line; anything else keeps its traceback
        _print_error(err)
        return 2
    finally:
        _teardown()
    # Every rank ends with the same summary (the stop decisions are all-reduced): rank 0 says it.
    if summary.get("preempted") is not None:
        from redi_megatron.training.preemption import EXIT_PREEMPTED

        say(f"redi-train: preempted: saved step {summary['preempted']} ({summary['last_checkpoint']}); "
            f"exit {EXIT_PREEMPTED}, run again (or requeue) to resume")
        return EXIT_PREEMPTED
    if summary["nonfinite"]:
        say(f"redi-train: stopped: {summary['nonfinite']}")
        return 4
    if summary["stopped"]:
        say(f"redi-train: stopped early: {summary['stopped']}")
        return 3
    say(f"redi-train: done, {summary['last_step']}/{summary['total_steps']} steps; "
        f"checkpoint {summary['last_checkpoint']}", stream=sys.stdout)
    return 0


def _check_loss_name(name: str) -> None:
    """A ``loss.name`` typo, refused before torch is imported (the registry does: a loss registered by the
    caller is in its registry, which is then already imported); the registry's own message."""
    from redi_megatron.config.schema import BUILTIN_LOSSES

    if name in BUILTIN_LOSSES or "redi_megatron.losses.registry" in sys.modules:
        return
    import difflib

    close = difflib.get_close_matches(str(name), BUILTIN_LOSSES, n=1)
    hint = f"; did you mean 'loss.name={close[0]}'?" if close else ""
    raise UserError(f"'loss.name': unknown loss {name!r}{hint} Known losses: {', '.join(BUILTIN_LOSSES)}")


def _print_error(err: UserError) -> None:
    """Once, from rank 0, for errors every rank hits: all of them before the process groups exist (the
    config and the same input files on every rank) and ``SharedError``s (a decision broadcast from
    rank 0). Any other error may be one rank's own (its checkpoint shard): that rank says
    it too, naming itself."""
    if first_rank():
        print(f"redi-train: error: {err}", file=sys.stderr, flush=True)
    elif _groups_exist() and not isinstance(err, SharedError):
        print(f"redi-train: error (rank {global_rank()}): {err}", file=sys.stderr, flush=True)


def _groups_exist() -> bool:
    if "torch.distributed" not in sys.modules:  # a config error: torch was never imported
        return False
    from redi_megatron.parallel.collectives import groups_initialized

    return groups_initialized()


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
