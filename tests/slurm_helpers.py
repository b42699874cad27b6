"""Helpers for tests that run on the CI Slurm cluster (.ci/slurm-up; tests marked `slurm`).

Interface (used by the Slurm tests of every area):
    require_cluster() -> dict[str, str]   env for subprocesses (SLURM_CONF set); skips outside CI, fails under
                                          REDI_REQUIRE_SLURM=1 when the cluster does not answer
    submit(script, *args, sbatch_args=(), env=None, cwd=REPO) -> int   sbatch --parsable, returns the job id
    job_info(job_id) -> dict[str, str]    scontrol show job fields (JobState, ExitCode, Restarts, StdOut, ...)
    job_state(job_id) -> str              e.g. COMPLETED, FAILED, CANCELLED, PENDING, RUNNING
    wait_jobs(ids, timeout) -> dict[int, str]   waits until every job is in a final state; their states
    scontrol(*args) / scancel(*args)      the commands with a timeout, checked
    direct_torchrun(config, overrides, port)   the same run under a direct 2-worker torchrun (asserts rc 0)
The cluster keeps finished jobs for an hour (MinJobAge=3600), so scontrol answers for them; there is no
accounting database (sacct does not work).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = Path(os.environ.get("REDI_SLURM_DIR", "/tmp/redi-slurm"))
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}
TIMEOUT_S = 30


def _required() -> bool:
    return os.environ.get("REDI_REQUIRE_SLURM", "") not in ("", "0")


def _conf() -> str | None:
    if os.environ.get("SLURM_CONF"):
        return os.environ["SLURM_CONF"]
    cand = CLUSTER_DIR / "slurm.conf"
    return str(cand) if cand.is_file() else None


def slurm_env() -> dict[str, str]:
    """The environment for Slurm commands: ours plus SLURM_CONF (and PYTHONPATH to this checkout)."""
    env = dict(os.environ)
    conf = _conf()
    if conf:
        env["SLURM_CONF"] = conf
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def require_cluster() -> dict[str, str]:
    """Skip (outside CI) or fail (REDI_REQUIRE_SLURM=1) unless the test cluster answers with 2 idle nodes."""
    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch not installed"
    elif _conf() is None:
        problem = "no SLURM_CONF and no cluster under " + str(CLUSTER_DIR) + " (start it with .ci/slurm-up)"
    else:
        try:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=slurm_env(), capture_output=True,
                                 text=True, timeout=TIMEOUT_S)
            nodes = {ln.split()[0] for ln in out.stdout.splitlines() if ln.strip()}
            if out.returncode != 0 or not {"n1", "n2"} <= nodes:
                problem = f"sinfo: rc={out.returncode} {out.stdout.strip()} {out.stderr.strip()}"
        except subprocess.TimeoutExpired:
            problem = "sinfo timed out"
    if problem:
        if _required():
            pytest.fail(f"Slurm test cluster missing (REDI_REQUIRE_SLURM=1): {problem}")
        pytest.skip(f"no Slurm test cluster: {problem}")
    return slurm_env()


def _run(cmd: list[str], timeout: float = TIMEOUT_S, **kw) -> str:
    out = subprocess.run(cmd, env=kw.pop("env", None) or slurm_env(), capture_output=True, text=True,
                         timeout=timeout, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def scontrol(*args: str) -> str:
    return _run(["scontrol", *args])


def scancel(*args: str) -> str:
    return _run(["scancel", *args])


def submit(script: str | Path, *args: str, sbatch_args: Iterable[str] = (), env: dict[str, str] | None = None,
           cwd: str | Path = REPO) -> int:
    """sbatch SCRIPT ARGS... from `cwd`; returns the job id."""
    out = _run(["sbatch", "--parsable", *sbatch_args, str(script), *args], env=env or slurm_env(), cwd=cwd)
    return int(out.strip().split(";")[0])


def job_info(job_id: int) -> dict[str, str]:
    """The `scontrol show job -o` fields of one job (key=value; values with spaces are kept whole)."""
    text = scontrol("show", "job", "-o", str(job_id)).strip()
    info: dict[str, str] = {}
    key = None
    for tok in text.split(" "):
        if "=" in tok and not tok.startswith("="):
            key, val = tok.split("=", 1)
            info[key] = val
        elif key:
            info[key] += " " + tok
    return info


def job_state(job_id: int) -> str:
    return job_info(job_id).get("JobState", "UNKNOWN")


def wait_jobs(ids: Iterable[int], timeout: float) -> dict[int, str]:
    """Wait until every job is in a final state (fails the test after `timeout` s); returns their states."""
    ids = list(ids)
    deadline = time.monotonic() + timeout
    while True:
        states = {j: job_state(j) for j in ids}
        if all(s in FINAL for s in states.values()):
            return states
        if time.monotonic() > deadline:
            pytest.fail(f"Slurm jobs not finished after {timeout} s: {states}")
        time.sleep(0.5)


def direct_torchrun(config: str | Path, overrides: Iterable[str], port: int, timeout: float = 240) -> None:
    """The same training run as a Slurm job, started directly (torchrun, 2 workers on this machine), to
    compare its per-step losses with the job's; asserts it exits 0."""
    import sys

    env = require_cluster()
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={port}", "-m", "redi_megatron.training.cli", "--config", str(config),
                        *overrides], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
