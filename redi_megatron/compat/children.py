"""Helper processes die with the process that made them (Linux), so a ``kill -9`` of a training rank
leaves nothing behind holding its files open.

Megatron's ``dist_checkpointing`` writer creates, on first use, a module-level results queue served by
a spawned ``multiprocessing`` Manager process; killed with -9, the rank leaves that server (and, through
it, multiprocessing's resource tracker) running for minutes. :func:`install_orphan_safe_writer_queue`
creates that queue first, from a Manager whose server process asks the kernel for SIGTERM when its
parent dies (``prctl(PR_SET_PDEATHSIG)``).

That server also ignores the stop signals (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) and dies by SIGKILL
with its parent instead: torchrun stops a worker with ``killpg(worker, SIGTERM)`` and Slurm signals every
process of a job step, so a server that died of the preemption signal made the very save the trainer was
finishing for that signal fail (``BrokenPipeError`` in ``write_preloaded_data_multiproc``).
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import sys

_PR_SET_PDEATHSIG = 1


# Signals a job's processes get when it is stopped or preempted (torchrun, Slurm, the trainer's defaults).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """In a child process: ask for ``sig`` when the parent exits (no-op off Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except OSError:
            pass


def _writer_server_init() -> None:
    """The writer's queue server outlives stop signals (the save in flight needs it) but not its parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


def install_orphan_safe_writer_queue() -> None:
    """Give Megatron's async file writer a results queue whose server process dies with this one."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", "missing") is not None:
        return  # already made (by us or by Megatron), or this version has no such queue
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_writer_server_init)
    fa._results_queue = manager.Queue()
    fa._redi_manager = manager  # keep the manager (and its server) alive as long as the queue
