"""Exclusive locks on outputs that a crashed process never leaves stuck (every tool: trainer run
directories, curate outputs, exports).

A lock is ``fcntl.flock`` on a small file: the kernel drops it when the holder dies (``kill -9``, a node
reboot of a local filesystem), so there is nothing stale to clean up by hand. The file records who holds
it (host, pid, time, what) so the refusal can name the holder. The second taker is refused at once, in
one line (:class:`~redi_megatron.errors.UserError`): a run that overlaps another one on the same output
must not start at all. Standard library only, so every layer may use it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from redi_megatron.errors import UserError


def lock_path_for(out: str | os.PathLike) -> Path:
    """The lock file guarding output directory ``out`` when the lock must exist before ``out`` does:
    ``.<name>.lock`` beside it (removed again on release)."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, *, remove: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on ``lock_file`` (created if needed) for the ``with`` block.

    Refuses with a one-line ``UserError`` naming ``what`` and the holder when another process holds it.
    ``remove``: unlink the lock file on release (for locks kept beside a user's output, so nothing is
    left behind); a taker that opened the old file before the unlink notices the swap and retries.
    """
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(f"{what} is in use by another process ({holder or 'holder unknown'}; lock "
                            f"{path}): wait for it to finish or stop it first") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and lock: take the new one
    try:
        info = f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        yield path
    finally:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.close(fd)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        return ""
