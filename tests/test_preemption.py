"""Preemption and the run-directory lock, for real: redi-train under torchrun (2 gloo ranks), signals sent
to the agent or to one worker mid-run, then the resumed run compared step by step with an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


def _cmd(data, save_dir, nproc=2, extra=(), interval=0):
    with socket.socket() as s:  # a free port per launch: two runs may overlap (the lock test)
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", port,
            "-m", "redi_megatron.training.cli", "--config", str(ROOT / "examples/configs/tiny_cpu_sft.yaml"),
            f"data.train_path={data['positives']}", f"data.tokenizer={data['tokenizer']}",
            f"checkpoint.save_dir={save_dir}", f"train.max_steps={STEPS}", f"checkpoint.save_interval={interval}",
            "data.max_prompt_tokens=200", "data.max_completion_tokens=312",
            *extra]


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _start(data, save_dir, **kw):
    return subprocess.Popen(_cmd(data, save_dir, **kw), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _losses(save_dir) -> dict[int, float]:
    out = {}
    path = Path(save_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def _wait_step(proc, save_dir, step, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if _losses(save_dir) and max(_losses(save_dir)) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {timeout}s")


def _worker(agent_pid: int, rank: int) -> int:
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank}")


def _checkpoints(save_dir) -> list[int]:
    d = Path(save_dir) / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in d.glob("step_*")) if d.exists() else []


@pytest.fixture(scope="module")
def reference(tiny_train_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("ref") / "run"
    out = subprocess.run(_cmd(tiny_train_data, save), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = _losses(save)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.parametrize("how", ["usr1_to_rank1", "term_to_agent"])
def test_signal_saves_that_step_and_resume_matches_uninterrupted(tiny_train_data, reference, tmp_path, how):
    save = tmp_path / "run"
    proc = _start(tiny_train_data, save)
    try:
        _wait_step(proc, save, 3)
        if how == "usr1_to_rank1":  # only rank 1 is told: rank 0 must stop at the same step (all-reduce)
            os.kill(_worker(proc.pid, 1), signal.SIGUSR1)
        else:  # torchrun forwards SIGTERM to every worker
            os.kill(proc.pid, signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc)
    marker = json.loads((save / "preempted.json").read_text())
    step = marker["step"]
    assert 3 <= step < STEPS, log[-3000:]
    assert marker["exit_code"] == 75
    assert _checkpoints(save) == [step], log[-3000:]  # the signal's step, no periodic or final one
    assert max(_losses(save)) == step  # the step in flight was finished and logged, none after it
    if how == "usr1_to_rank1":
        assert "exited with code 75" in log or "exitcode  : 75" in log or proc.returncode != 0, log[-2000:]
    # the requeue: same command, resumes from that step and ends with the same per-step losses
    out = subprocess.run(_cmd(tiny_train_data, save), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming from step_{step:07d}" in out.stdout
    assert _losses(save) == reference


def test_second_run_on_the_same_dir_is_refused_and_a_killed_holder_leaves_no_lock(tiny_train_data, tmp_path):
    save = tmp_path / "run"
    # still running when killed: enough epochs that a slow second start cannot see it finish (and save)
    first = _start(tiny_train_data, save, nproc=1, extra=("train.max_steps=100000", "train.epochs=1000"))
    try:
        _wait_step(first, save, 1)
        second = subprocess.run(_cmd(tiny_train_data, save), cwd=ROOT, env=_env(), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode != 0
        assert "is in use by another process (host" in second.stdout + second.stderr
        holder = _worker(first.pid, 0)
        assert f"pid {holder}" in second.stdout + second.stderr
        os.kill(holder, signal.SIGKILL)  # a crash of the lock holder: kill -9, no chance to clean up
    finally:
        _kill_tree(first)  # the agent and its workers (which run in their own sessions)
        first.communicate()
    assert not (save / "checkpoints").exists() or not _checkpoints(save)
    steps_before = _losses(save)
    assert len(steps_before) == len(set(steps_before))
    again = subprocess.run(_cmd(tiny_train_data, save, nproc=1), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sorted(_losses(save)) == list(range(1, STEPS + 1))


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL every process under the agent by pid, then the agent: torchrun starts each worker in its own
    session, so killing the agent's process group alone would leave a failed test's workers running."""
    if proc.poll() is not None:
        return
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children of all its threads, recursively); vanished ones are skipped."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for t in Path(f"/proc/{p}/task").iterdir() for k in (t / "children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def test_signals_during_the_save_leave_complete_checkpoints(tiny_train_data, reference, tmp_path):
    """After periodic saves (so the checkpoint writer's helper processes exist), SIGTERM to the agent, then
    SIGTERM and SIGUSR1 to every process under it (workers, the writer's forked writers and its queue server)
    every 20 ms until the run has exited, as Slurm signals every process of a job step and torchrun signals a
    worker's whole process group: the step in flight is still saved complete and chosen on resume, every
    checkpoint verifies, no partial one is left, and the resumed losses equal the uninterrupted run's."""
    from redi_megatron.models.manifest import verify_manifest

    save = tmp_path / "run"
    proc = _start(tiny_train_data, save, interval=2)
    sent, helpers = 0, set()
    try:
        _wait_step(proc, save, 3)
        workers = {_worker(proc.pid, 0), _worker(proc.pid, 1)}  # before they start exiting
        os.kill(proc.pid, signal.SIGTERM)
        while proc.poll() is None:
            for i, pid in enumerate(_descendants(proc.pid)):
                try:
                    os.kill(pid, (signal.SIGTERM, signal.SIGUSR1)[(sent + i) % 2])
                    sent += 1
                    helpers |= {pid} - workers
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        log = proc.communicate(timeout=120)[0]
    finally:
        _kill_tree(proc)
    assert sent > 20 and helpers, (sent, helpers)  # the writer's helpers were hit too, many times
    marker = json.loads((save / "preempted.json").read_text())
    step = marker["step"]
    assert 3 <= step < STEPS, log[-3000:]
    assert step in _checkpoints(save) and max(_checkpoints(save)) == step, log[-3000:]
    assert not list((save / "checkpoints").glob(".*partial*")), list((save / "checkpoints").iterdir())
    for n in _checkpoints(save):
        verify_manifest(save / "checkpoints" / f"step_{n:07d}", False)
    out = subprocess.run(_cmd(tiny_train_data, save, interval=2), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming from step_{step:07d}" in out.stdout
    assert _losses(save) == reference
