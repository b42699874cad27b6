"""Answer grading: the public ``grade()`` and a process pool with per-answer time limits.

Two graders, selected by name:

* ``"rllm"``: rllm/DeepScaleR-compatible (see :mod:`redi_megatron.eval.rllm_grader`), the one
  REDI's Table 1 numbers come from.
* ``"math_verify"``: HF math-verify on the same answer region (:mod:`redi_megatron.eval.mv_grader`).

Both use SIGALRM for their time limits, which only works in a process's main thread, so bulk
grading runs in worker *processes* (:class:`GradingPool`), never threads. A worker stuck in C code
(where Python signal handlers cannot run) is killed by the parent and replaced, and its answer is
graded wrong with status ``"killed"``.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Optional

from tqdm import tqdm

from redi_megatron.errors import UserError
from redi_megatron.eval.timeouts import GradeTimeout, deadline

GRADERS = ("rllm", "math_verify")
DEFAULT_TIMEOUT_S = 10.0
Gold = str | Sequence[str]


@dataclass(frozen=True)
class GradeResult:
    """Verdict for one response. ``status``: ok | no_answer | timeout | error | killed."""

    correct: bool
    extracted: Optional[str]
    status: str
    seconds: float


def _check_args(grader: str, gold: Gold) -> None:
    if grader not in GRADERS:
        raise UserError(f"unknown grader {grader!r}; choose one of {', '.join(GRADERS)}")
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds or not all(isinstance(g, str) for g in golds):
        raise UserError(f"gold must be a string or a non-empty list of strings, got {gold!r}")


def _grade_fn(grader: str):
    if grader == "rllm":
        from redi_megatron.eval.rllm_grader import grade_rllm

        return grade_rllm
    from redi_megatron.eval.mv_grader import grade_math_verify

    return grade_math_verify


def grade_detailed(
    response: str,
    gold: Gold,
    grader: str = "rllm",
    *,
    require_think: bool = True,
    timeout: Optional[float] = DEFAULT_TIMEOUT_S,
) -> GradeResult:
    """Grade one response in this process (SIGALRM time limit when called from the main thread).

    Args:
        response: the model's generated text (without the prompt).
        gold: the gold answer, or a list of accepted alternatives (Minerva).
        grader: ``"rllm"`` or ``"math_verify"``.
        require_think: a response without ``</think>`` is wrong (rllm's format rule). With False,
            such a response is graded on its whole text.
        timeout: seconds for this answer; None disables the limit.
    """
    _check_args(grader, gold)
    fn = _grade_fn(grader)
    start = time.perf_counter()
    try:
        with deadline(timeout):
            correct, extracted = fn(response, gold, require_think=require_think)
    except GradeTimeout:
        return GradeResult(False, None, "timeout", time.perf_counter() - start)
    except Exception as exc:  # a grader bug on odd input must not abort a 20k-sample evaluation
        return GradeResult(False, None, f"error: {type(exc).__name__}: {exc}"[:300], time.perf_counter() - start)
    status = "ok" if extracted is not None else "no_answer"
    return GradeResult(bool(correct), extracted, status, time.perf_counter() - start)


def grade(response: str, gold: Gold, grader: str = "rllm", **kwargs) -> bool:
    """True if ``response`` answers ``gold`` correctly under ``grader`` (see :func:`grade_detailed`)."""
    return grade_detailed(response, gold, grader, **kwargs).correct


# ----------------------------------------------------------------------------------------------
# Process pool
# ----------------------------------------------------------------------------------------------
def _worker_main(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    # sympy's deprecation chatter on odd model answers would flood the parent's stderr.
    warnings.simplefilter("ignore", DeprecationWarning)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        task_id, response, gold, grader, require_think, timeout = task
        result = grade_detailed(response, gold, grader, require_think=require_think, timeout=timeout)
        conn.send((task_id, result))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()
        self.inflight: collections.deque[int] = collections.deque()
        self.busy_since = 0.0  # when the task at the head of `inflight` started

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class GradingPool:
    """Grade many responses in worker processes, each answer under a SIGALRM time limit.

    Args:
        workers: number of processes (default: all CPUs); 0 grades in this process.
        timeout: per-answer limit in seconds, enforced inside the worker with SIGALRM.
        kill_grace: a worker still busy ``timeout + kill_grace`` s after starting an answer is
            stuck outside Python; it is killed and replaced.
        start_method: multiprocessing start method; "forkserver" keeps workers free of the
            parent's threads (a loaded model, vLLM) and forks them from a server that has
            already imported sympy and math-verify.
    """

    _PREFETCH = 2  # tasks queued per worker so it never waits for the parent

    def __init__(
        self,
        workers: Optional[int] = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        kill_grace: float = 10.0,
        start_method: str = "forkserver",
    ) -> None:
        self.num_workers = (os.cpu_count() or 1) if workers is None else workers
        if self.num_workers < 0:
            raise UserError(f"workers must be >= 0, got {workers}")
        self.timeout = timeout
        self.kill_grace = kill_grace
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["redi_megatron.eval._preload"])
        self._workers: list[_Worker] = []

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.kill()
        self._workers = []

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx))

    def grade_many(
        self,
        items: Sequence[tuple[str, Gold]],
        grader: str = "rllm",
        *,
        require_think: bool = True,
        progress: bool = True,
        desc: str = "grading",
    ) -> list[GradeResult]:
        """Grade ``(response, gold)`` pairs; results come back in input order."""
        for _, gold in items:
            _check_args(grader, gold)
        if self.num_workers == 0:
            return [grade_detailed(r, g, grader, require_think=require_think, timeout=self.timeout)
                    for r, g in tqdm(items, desc=desc, disable=not progress)]
        self._ensure_workers()
        results: list[Optional[GradeResult]] = [None] * len(items)
        pending = collections.deque(range(len(items)))
        with tqdm(total=len(items), desc=desc, disable=not progress) as bar:
            while pending or any(w.inflight for w in self._workers):
                self._dispatch(pending, items, grader, require_think)
                ready = wait([w.conn for w in self._workers if w.inflight], timeout=0.5)
                for worker in [w for w in self._workers if w.conn in ready]:
                    done = self._receive(worker, pending, results)
                    bar.update(done)
                bar.update(self._reap_stuck(pending, results))
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _dispatch(self, pending, items, grader: str, require_think: bool) -> None:
        for index in range(len(self._workers)):
            worker = self._workers[index]
            while pending and len(worker.inflight) < self._PREFETCH:
                task_id = pending.popleft()
                response, gold = items[task_id]
                gold = gold if isinstance(gold, str) else list(gold)
                try:
                    worker.conn.send((task_id, response, gold, grader, require_think, self.timeout))
                except (BrokenPipeError, OSError):  # the worker died since the last round
                    pending.appendleft(task_id)
                    if worker.inflight:
                        break  # its pipe reads EOF next: _receive fails its current answer and replaces it
                    worker.kill()
                    worker = self._workers[index] = _Worker(self._ctx)
                    continue
                if not worker.inflight:
                    worker.busy_since = time.monotonic()
                worker.inflight.append(task_id)

    def _receive(self, worker: _Worker, pending, results) -> int:
        try:
            task_id, result = worker.conn.recv()
        except (EOFError, OSError):  # the worker died (OOM killer, segfault in a C extension)
            return self._replace(worker, pending, results, "error: grading worker died")
        assert task_id == worker.inflight[0], "workers answer in order"
        worker.inflight.popleft()
        worker.busy_since = time.monotonic()
        results[task_id] = result
        return 1

    def _reap_stuck(self, pending, results) -> int:
        done = 0
        limit = self.timeout + self.kill_grace
        for worker in list(self._workers):
            if worker.inflight and time.monotonic() - worker.busy_since > limit:
                done += self._replace(worker, pending, results, "killed")
        return done

    def _replace(self, worker: _Worker, pending, results, status: str) -> int:
        """Kill ``worker``, fail its current answer with ``status``, requeue the rest."""
        head, *rest = worker.inflight
        results[head] = GradeResult(False, None, status, time.monotonic() - worker.busy_since)
        pending.extendleft(reversed(rest))
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx)
        return 1
