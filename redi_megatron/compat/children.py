"""Helper processes die with the process that made them (Linux), so a ``kill -9`` of a training rank
leaves nothing behind holding its files open.

Megatron's ``dist_checkpointing`` writer creates, on first use, a module-level results queue served by
a spawned ``multiprocessing`` Manager process; killed with -9, the rank leaves that server (and, through
it, multiprocessing's resource tracker) running for minutes. :func:`install_orphan_safe_writer_queue`
creates that queue first, from a Manager whose server process asks the kernel for SIGTERM when its
parent dies (``prctl(PR_SET_PDEATHSIG)``).
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process: ask for SIGTERM when the parent exits (no-op off Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except OSError:
            pass


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
    manager.start(initializer=die_with_parent)
    fa._results_queue = manager.Queue()
    fa._redi_manager = manager  # keep the manager (and its server) alive as long as the queue
