"""Run a function on N gloo ranks with a Megatron TP/PP/CP(/DP) layout, for tests and benchmarks.

``run_distributed(fn, world_size=4, tp=2, pp=2)`` forks ``world_size`` processes from the (already
imported) caller, initialises ``torch.distributed`` with gloo and Megatron's ``parallel_state`` with the
layout, calls ``fn(*args, **kwargs)`` on every rank and returns the list of per-rank results (anything
``torch.save`` can serialise). A failing rank's traceback is re-raised in the caller; a rank that does
not finish within ``timeout`` seconds (a hung collective) fails the call instead of hanging CI.

Forking costs ~0.3 s where ``torchrun`` costs 6-24 s, which is what keeps the parallel test suite fast
on 2 cores. Nothing here touches ``torch.cuda``.
"""
from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from redi_megatron.parallel.state import free_port, live_groups

ALLOWED_WORLD_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout; ``dp`` is derived from the world size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None

    def dp(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp={model_parallel}")
        return world_size // model_parallel


class RankFailed(RuntimeError):
    """A rank raised or timed out; the message carries its traceback."""


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _child(rank: int, world_size: int, port: int, layout: Layout, fn: Callable, args, kwargs, conn,
           stack_file: str):
    try:
        # On timeout the parent sends SIGUSR1: the rank writes where it is stuck.
        faulthandler.register(signal.SIGUSR1, file=open(stack_file, "w"), all_threads=False)
        torch.set_num_threads(1)
        _allow_checkpoint_writes()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        from redi_megatron.parallel.state import destroy_parallel, init_parallel

        init_parallel(tp=layout.tp, pp=layout.pp, cp=layout.cp, vpp=layout.vpp,
                      rank=rank, world_size=world_size)
        try:
            result = fn(*args, **kwargs)
        finally:
            destroy_parallel()
        conn.send_bytes(_dumps(("ok", result)))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        conn.send_bytes(_dumps(("error", traceback.format_exc())))
    finally:
        conn.close()
        # Skip interpreter teardown: gloo threads sometimes abort at exit after success.
        os._exit(0)


def _allow_checkpoint_writes() -> None:
    """Let a forked rank save Megatron dist checkpoints.

    The writer forks helper processes (not allowed from a daemonic process) and collects their results
    through a queue it creates with a *spawned* ``Manager``; a rank that leaves with ``os._exit`` would
    orphan that server, and the save is synchronous here, so an in-process queue does the same job.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    mp.current_process().daemon = False
    filesystem_async._results_queue = queue.Queue()


def run_distributed(fn: Callable, world_size: int, *, tp: int = 1, pp: int = 1, cp: int = 1,
                    vpp: int | None = None, timeout: float = 120.0, args: tuple = (),
                    kwargs: dict | None = None) -> list[Any]:
    """Run ``fn`` on ``world_size`` forked gloo ranks; return the per-rank results in rank order."""
    if world_size not in ALLOWED_WORLD_SIZES:
        raise ValueError(f"world_size must be one of {ALLOWED_WORLD_SIZES}, got {world_size}")
    layout = Layout(tp=tp, pp=pp, cp=cp, vpp=vpp)
    layout.dp(world_size)
    # Import Megatron once in the parent so every fork inherits it (saves ~1.5 s per rank).
    import megatron.core.pipeline_parallel  # noqa: F401

    import redi_megatron.parallel.state  # noqa: F401
    held = live_groups()
    if held:  # a forked rank would inherit them and hang (or talk to the parent's world): fail loudly instead
        raise RuntimeError(f"run_distributed: this process still holds process groups ({', '.join(held)}); "
                           "call redi_megatron.parallel.state.destroy_parallel() before forking ranks")
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    stack_dir = tempfile.mkdtemp(prefix="redi_ranks_")
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(rank, world_size, port, layout, fn, args, kwargs or {},
                                             child_conn, os.path.join(stack_dir, f"rank{rank}.txt")),
                        daemon=True)
        p.start()
        child_conn.close()
        procs.append(p)
        conns.append(parent_conn)
    try:
        return _collect(procs, conns, timeout, stack_dir)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        shutil.rmtree(stack_dir, ignore_errors=True)  # the stacks were read into the error, if any


def _stacks(procs, pending: set[int], stack_dir: str) -> str:
    """Ask the stuck ranks for their Python stacks (faulthandler) and return them."""
    for r in pending:
        if procs[r].is_alive():
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(0.5)
    dumps = []
    for r in sorted(pending):
        path = os.path.join(stack_dir, f"rank{r}.txt")
        text = open(path).read() if os.path.exists(path) else "(no stack)"
        dumps.append(f"--- rank {r} stack ---\n{text.strip()}")
    return "\n".join(dumps)


def _collect(procs, conns, timeout: float, stack_dir: str) -> list[Any]:
    deadline = time.monotonic() + timeout
    results: list[Any] = [None] * len(procs)
    pending = set(range(len(procs)))
    errors: list[str] = []
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RankFailed(f"ranks {sorted(pending)} did not finish within {timeout:.0f} s "
                             f"(hung collective?)\n" + _stacks(procs, pending, stack_dir))
        ready = mp.connection.wait([conns[r] for r in pending], timeout=min(left, 1.0))
        for conn in ready:
            rank = conns.index(conn)
            pending.discard(rank)
            try:
                status, payload = torch.load(io.BytesIO(conn.recv_bytes()), weights_only=False)
            except EOFError:
                status, payload = "error", f"rank {rank} died without a result (exit code {procs[rank].exitcode})"
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
        if errors:
            # One rank failing usually leaves its peers blocked in a collective: report it now.
            raise RankFailed("\n".join(errors))
    return results
