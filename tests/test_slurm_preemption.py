"""Preemption under the real CI Slurm cluster (marked `slurm`): train.sbatch on 2 nodes x 1 gloo worker is
stopped mid-run, by the time-limit early warning (`scancel --signal=USR1 --batch`, what `#SBATCH
--signal=B:USR1@120` delivers) and by `scontrol requeue`; the job is requeued (same job id, log appended), the
second attempt resumes from the step saved at the signal (not the last periodic checkpoint), no partial
checkpoint exists or is chosen, and the per-step losses equal an uninterrupted direct torchrun's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_helpers import REPO, direct_torchrun, job_info, require_cluster, scancel, scontrol, submit, wait_jobs

pytestmark = pytest.mark.slurm
SLURM = REPO / "examples" / "slurm"
STEPS, INTERVAL = 20, 4  # ~0.2 s a step: room for the signal to arrive before the end
SIGNAL_AT = INTERVAL + 1  # after the periodic checkpoint of step 4: the save at the signal must be newer


def _overrides(data: dict, run: Path) -> list[str]:
    return [f"data.train_path={data['positives']}", f"data.tokenizer={data['tokenizer']}",
            f"train.max_steps={STEPS}", f"checkpoint.save_dir={run}", f"checkpoint.save_interval={INTERVAL}",
            "checkpoint.keep_last=0", "logging.tensorboard=false", "data.max_prompt_tokens=200",
            "data.max_completion_tokens=400", "data.micro_batch_tokens=640"]


def _steps(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "step" in r and "loss" in r:
            out.append((r["step"], r["loss"]))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_train_data, tmp_path_factory) -> list[tuple[int, float]]:
    """The same config under a direct torchrun (2 workers on this machine), never stopped."""
    run = tmp_path_factory.mktemp("direct") / "run"
    direct_torchrun(REPO / "examples/configs/tiny_cpu_sft.yaml", _overrides(tiny_train_data, run),
                    port=29600 + os.getpid() % 1000)
    losses = _steps(run)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return losses


def _start_job(tmp_path: Path, data: dict) -> tuple[int, Path]:
    env = require_cluster()
    env.update({"REPO_DIR": str(REPO), "CONTAINER_DIR": str(REPO), "IMAGE": "redi-ci.sqsh", "OMP_NUM_THREADS": "1"})
    run = tmp_path / "run"
    job = submit(SLURM / "train.sbatch", str(REPO / "examples/configs/tiny_cpu_sft.yaml"), *_overrides(data, run),
                 sbatch_args=["--nodes=2", "--gpus-per-node=1", "--time=10"], env=env, cwd=tmp_path)
    return job, run


def _wait_for_step(job: int, run: Path, step: int, timeout: float = 150) -> int:
    deadline, polled = time.monotonic() + timeout, time.monotonic()
    while time.monotonic() < deadline:
        done = _steps(run)
        if done and done[-1][0] >= step:
            return done[-1][0]
        if time.monotonic() > polled + 2:  # now and then: has the job failed?
            polled = time.monotonic()
            info = job_info(job)
            assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), info
        time.sleep(0.02)
    pytest.fail(f"job {job}: no step {step} in {timeout} s")


def _release_requeued(job: int, timeout: float = 60) -> None:
    """Wait until the job is back in the queue (requeued), then start it now (Slurm holds a requeued job
    ~120 s otherwise)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if int(info.get("Restarts", "0")) >= 1 and info["JobState"] == "PENDING":
            scontrol("update", f"JobId={job}", "StartTime=now")
            return
        time.sleep(0.2)
    pytest.fail(f"job {job} was not requeued within {timeout} s: {job_info(job)}")


def _check_resumed(tmp_path: Path, job: int, run: Path, signalled_at: int, uninterrupted) -> str:
    from redi_megatron.models.manifest import verify_manifest

    assert wait_jobs([job], timeout=180) == {job: "COMPLETED"}, job_info(job)
    log = (tmp_path / f"slurm-redi-train-{job}.out").read_text()
    assert int(job_info(job)["Restarts"]) == 1
    assert len(re.findall(rf"redi-train: job {job}, 2 node\(s\) x 1 GPU\(s\)", log)) == 2, log[-4000:]  # appended
    marker = json.loads((run / "preempted.json").read_text())
    saved = marker["step"]
    # the step in flight at the signal was saved, not only the periodic one before it
    assert signalled_at <= saved < STEPS, (signalled_at, saved, log[-4000:])
    assert marker["checkpoint"].endswith(f"step_{saved:07d}")
    assert f"preempted (SIGTERM): saved step {saved}" in log, log[-4000:]
    assert f"resuming from step_{saved:07d}" in log, log[-4000:]
    ckpts = run / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if not re.fullmatch(r"step_\d{7}", p.name)], list(ckpts.iterdir())
    steps = sorted(int(p.name[5:]) for p in ckpts.iterdir())
    assert steps == sorted({*range(INTERVAL, STEPS + 1, INTERVAL), saved}), steps
    for n in steps:
        verify_manifest(ckpts / f"step_{n:07d}", False)
    # every step exactly once, each with the uninterrupted run's loss
    assert _steps(run) == uninterrupted
    return log


def test_early_warning_signal_saves_requeues_and_resumes(tmp_path, tiny_train_data, uninterrupted):
    """`scancel --signal=USR1 --batch`: the batch script passes TERM on, the run saves the step in flight and
    exits 75, and the script requeues its own job."""
    job, run = _start_job(tmp_path, tiny_train_data)
    try:
        at = _wait_for_step(job, run, SIGNAL_AT)
        scancel("--signal=USR1", "--batch", str(job))
        _release_requeued(job)
        log = _check_resumed(tmp_path, job, run, at, uninterrupted)
    finally:
        subprocess.run(["scancel", str(job)], env=require_cluster(), timeout=30)
    assert f"job {job} stopped on the early-warning signal" in log


def test_scontrol_requeue_mid_run_resumes_from_the_step_at_the_signal(tmp_path, tiny_train_data, uninterrupted):
    """`scontrol requeue` of the running job: Slurm sends TERM (KillWait=10 s before KILL), the run saves the
    step in flight, and Slurm starts the job again."""
    job, run = _start_job(tmp_path, tiny_train_data)
    try:
        at = _wait_for_step(job, run, SIGNAL_AT)
        scontrol("requeue", str(job))
        _release_requeued(job)
        _check_resumed(tmp_path, job, run, at, uninterrupted)
    finally:
        subprocess.run(["scancel", str(job)], env=require_cluster(), timeout=30)
