"""redi_megatron.locks: a second taker is refused in one line, a dead holder leaves nothing stuck."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from redi_megatron.errors import UserError
from redi_megatron.locks import exclusive, lock_path_for


def test_second_taker_refused_and_file_removed(tmp_path):
    lock = lock_path_for(tmp_path / "out")
    with exclusive(lock, "output out"):
        with pytest.raises(UserError, match=r"output out is in use by another process \(host .* pid"):
            with exclusive(lock, "output out"):
                pass
    assert not lock.exists()  # nothing left beside the user's output
    with exclusive(lock, "output out"):  # free again
        pass


def _hold_and_die(path, ready):
    with exclusive(path, "run", remove=False):
        ready.set()
        signal.pause()


def test_killed_holder_releases(tmp_path):
    lock = tmp_path / "run" / ".lock"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_and_die, args=(lock, ready))
    proc.start()
    assert ready.wait(30)
    with pytest.raises(UserError, match="in use"):
        with exclusive(lock, "run", remove=False):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    with exclusive(lock, "run", remove=False):  # the kernel dropped the dead holder's lock
        pass
