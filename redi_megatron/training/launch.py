"""``redi-launch``: run a recipe through NeMo-Run (the launcher of NeMo 2 and Megatron-Bridge).

    redi-launch --config RECIPE.yaml [key=value ...] --executor local --nproc-per-node 8
    redi-launch --config RECIPE.yaml [key=value ...] --executor slurm --account A --partition P \\
        --nodes 2 --gpus-per-node 8 [--container-image IMG.sqsh]

Whatever the executor, the job is ``torchrun ... -m redi_megatron.training.cli --config RECIPE key=value ...``
(a ``run.Script`` with NeMo-Run's ``torchrun`` launcher), i.e. exactly what ``redi-train`` runs, so a run
started here and one started by hand give the same steps. ``local`` is ``run.LocalExecutor(launcher="torchrun")``
on this machine; ``slurm`` is ``run.SlurmExecutor`` with a ``run.LocalTunnel`` (submit from a login node of the
cluster; sbatch/srun must be on PATH), one torchrun agent per node. The recipe and its overrides are checked
here before anything is submitted. Needs the ``nemo-run`` extra: ``pip install -e ".[nemo-run]"``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from redi_megatron.errors import MissingDependency, UserError

TRAIN_MODULE = "redi_megatron.training.cli"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redi-launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Commands and measured times: examples/slurm/README.md ('NeMo-Run').")
    p.add_argument("--config", required=True, help="YAML recipe (examples/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for redi-train")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="torchrun workers per node [local: 1; slurm: --gpus-per-node, else 1]")
    p.add_argument("--nodes", type=int, default=1, help="slurm: number of nodes (one torchrun agent each)")
    p.add_argument("--account", default=None, help="slurm: --account (omit where the cluster has none)")
    p.add_argument("--partition", default=None, help="slurm: --partition")
    p.add_argument("--gpus-per-node", type=int, default=None, help="slurm: --gpus-per-node (omit on CPU nodes)")
    p.add_argument("--time", default="04:00:00", help="slurm: --time [04:00:00]")
    p.add_argument("--container-image", default=None,
                   help="slurm: pyxis --container-image (the repo's image); omit to run the site Python")
    p.add_argument("--container-mounts", default="", help="slurm: comma-separated SRC:DST mounts")
    p.add_argument("--job-dir", default=None,
                   help="where NeMo-Run writes the sbatch script and logs (shared filesystem for slurm) "
                        "[$NEMORUN_HOME/experiments, i.e. ~/.nemo_run/experiments]")
    p.add_argument("--workdir", default=None,
                   help="the job's working directory: relative paths of the recipe resolve here [this one]")
    p.add_argument("--rdzv-port", type=int, default=29500, help="torchrun rendezvous port on the first node")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the job (repeatable)")
    p.add_argument("--name", default=None, help="experiment name [the recipe's name]")
    p.add_argument("--detach", action="store_true", help="submit and return (slurm); the job keeps running")
    p.add_argument("--dryrun", action="store_true", help="print what would run; start nothing")
    return p


def _check(args: argparse.Namespace) -> Any:
    """Everything that can be checked before a job exists: the recipe, the overrides and the flags."""
    from redi_megatron.config.loader import load_config

    cfg = load_config(args.config, list(args.overrides))
    for flag in ("nproc_per_node", "nodes", "gpus_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1 (got {value})")
    if args.executor == "local" and args.nodes != 1:
        raise UserError("--nodes > 1 needs --executor slurm (the local executor runs on this machine)")
    if args.executor == "slurm" and not args.container_image:
        # NeMo-Run writes its sbatch script for a container's /nemo_run mount and, without a container,
        # replaces every "/nemo_run" in the script by the job's directory: such a path would be rewritten.
        paths = [("--job-dir", args.job_dir), ("--workdir", args.workdir or os.getcwd()),
                 ("--config", str(Path(args.config).resolve()))] + [("override", o) for o in args.overrides]
        for what, value in paths:
            if value and "/nemo_run" in value:
                raise UserError(f"{what} {value!r} contains '/nemo_run', which NeMo-Run's SlurmExecutor rewrites "
                                "in its sbatch script when there is no container; use another directory name")
    for item in args.env:
        if "=" not in item:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
    return cfg


def _nproc(args: argparse.Namespace) -> int:
    return args.nproc_per_node or (args.gpus_per_node if args.executor == "slurm" else None) or 1


def make_script(args: argparse.Namespace) -> Any:
    """The job: ``python -m redi_megatron.training.cli --config ABS_RECIPE key=value ...`` as a ``run.Script``
    (NeMo-Run wraps it in torchrun)."""
    import nemo_run as run

    env = dict(item.split("=", 1) for item in args.env)
    return run.Script(path=TRAIN_MODULE, m=True, entrypoint="python", env=env,
                      args=["--config", str(Path(args.config).resolve()), *args.overrides])


def make_executor(args: argparse.Namespace) -> Any:
    """``run.LocalExecutor`` or ``run.SlurmExecutor`` (local tunnel), both with the torchrun launcher."""
    import nemo_run as run

    workdir = str(Path(args.workdir or os.getcwd()).resolve())
    launcher = run.Torchrun(rdzv_port=args.rdzv_port)
    if args.executor == "local":
        # The local scheduler starts the job in the current directory; workdir is applied in main().
        return run.LocalExecutor(launcher=launcher, ntasks_per_node=_nproc(args))
    mounts = [m for m in args.container_mounts.split(",") if m]
    if args.container_image:  # the image sees the workdir at the same path, and starts there
        mounts.append(f"{workdir}:{workdir}")
        srun_args = [f"--container-workdir={workdir}"]
    else:  # NeMo-Run's default --chdir is its (empty) code dir; a later --chdir wins
        srun_args = [f"--chdir={workdir}"]
    job_dir = os.path.join(_base_dir(args), "experiments") if args.job_dir else ""
    return run.SlurmExecutor(
        account=args.account,  # None: no #SBATCH --account line
        partition=args.partition, nodes=args.nodes, ntasks_per_node=_nproc(args),
        gpus_per_node=args.gpus_per_node, time=args.time, container_image=args.container_image,
        container_mounts=mounts, srun_args=srun_args, launcher=launcher,
        tunnel=run.LocalTunnel(job_dir=job_dir),
        packager=run.Packager(),  # the code is the installed redi-megatron (site env or image), not a tarball
        job_name_prefix="redi-")


def _base_dir(args: argparse.Namespace) -> Optional[str]:
    """NeMo-Run's home for this launch (experiments/<name>/<id>/ below it), or None for its default."""
    return str(Path(args.job_dir).resolve()) if args.job_dir else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after the flags
    try:
        cfg = _check(args)
        try:
            import nemo_run as run
        except ImportError as err:
            raise MissingDependency(f"redi-launch needs NeMo-Run ({err}): pip install -e \".[nemo-run]\"") from err
        script, executor = make_script(args), make_executor(args)
    except UserError as err:
        print(f"redi-launch: error: {err}", file=sys.stderr)
        return 2
    base_dir = _base_dir(args)
    if args.workdir:
        os.chdir(args.workdir)
    name = args.name or cfg.name or "redi"
    exp_id = f"{name}_{time.time_ns()}"
    with run.Experiment(name, executor=executor, id=exp_id, base_dir=base_dir, log_level="WARN") as exp:
        exp.add(script, name=name, tail_logs=not args.detach)
        if args.dryrun:
            exp.dryrun()
            return 0
        exp.run(detach=args.detach)
    # Leaving the block waited for the job (unless detached); its state is final now.
    job = exp.jobs[0]
    if args.detach:  # the handle is scheduler://session/APP_ID/ROLE; APP_ID is the Slurm job id
        app_id = (job.handle or "").partition("://")[2].split("/")[1:2]
        print(f"redi-launch: submitted {name}: job {''.join(app_id) or '?'} (experiment {exp_id}; "
              f"logs in {job.executor.job_dir}); status: nemo experiment status {exp_id}")
        return 0
    print(f"redi-launch: {name} ended {job.state.name} (experiment {exp_id}; logs in {job.executor.job_dir})")
    return 0 if job.state.name == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
