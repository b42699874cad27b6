"""Output directories that never lose a user's data (every tool: curate, converters, demo, eval).

The rules, in order:
1. validate first: :func:`check_output` refuses an output that is, contains or sits inside an input, an
   existing output without ``overwrite``, a path under a regular file and an unwritable parent, before
   any work starts;
2. build the new output beside the old one (:func:`staging_dir`: ``.<name>.partial`` next to it);
3. swap it in only when complete (:func:`publish`): with ``overwrite`` the old output is moved aside,
   the new one renamed into place, and only then is the old one deleted.

Files are written the same way, at file scale: :func:`write_atomic` writes beside the target and renames
(readers never see half a file; a crash leaves the old one). Only directories this module made are ever
deleted: the staging and set-aside directories carry a marker file, and a leftover without the marker is
refused rather than removed. Standard library only, so every layer may use it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional, Union

from redi_megatron.errors import UserError

MARKER = ".redi-megatron-staging"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(path)))


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(out: str | os.PathLike, inputs: Iterable[Optional[str | os.PathLike]], *, overwrite: bool,
                 flag: str = "--out") -> Path:
    """Validate ``out`` before anything is read or written; returns it as a ``Path``.

    ValueError (one line, naming the path and the flag) when ``out`` is, contains or is inside any of
    ``inputs``; exists without ``overwrite``; exists and is not a directory; lies under a regular file;
    or its nearest existing parent is not writable.
    """
    path = Path(out)
    target = _resolved(path)
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        source = _resolved(inp)
        if _overlap(target, source):
            raise UserError(f"{flag} {path} overlaps the input {inp}: writing there could destroy it "
                             "(an output must not be, contain or sit inside an input)")
    if path.is_symlink():
        raise UserError(f"{flag} {path} is a symbolic link: give the directory it points to "
                        f"({os.path.realpath(path)}) or a new path (an output is replaced by rename, which "
                        "would replace the link, not what it points to)")
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {path} exists and is not a directory")
        if not overwrite:
            raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it (the old one is "
                             "kept until the new one is complete)")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")
    return path


def staging_path(out: str | os.PathLike) -> Path:
    """Where the new ``out`` is assembled: ``.<name>.partial`` beside it (same filesystem, so the final
    rename is atomic)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh, empty :func:`staging_path` (a stale one of ours from a crash is replaced)."""
    tmp = staging_path(out)
    _remove_ours(tmp)
    tmp.mkdir(parents=True)
    (tmp / MARKER).write_text("made by redi-megatron; removed when complete\n")
    return tmp


def publish(tmp: Path, out: str | os.PathLike, *, ours: Optional[Callable[[str], bool]] = None) -> Path:
    """Swap the complete ``tmp`` in as ``out``. An existing ``out`` is moved aside first and deleted only
    once the new one is in place; if the swap fails, the old one is put back.

    ``ours(name)``: which top-level entries of an old ``out`` the tool wrote. When given, every other entry
    of the old ``out`` (a user's ``README.md``, ``eval_results/``) that the new output does not replace is
    carried over into the new one instead of being deleted."""
    out = Path(out)
    (tmp / MARKER).unlink(missing_ok=True)
    if not out.exists():
        tmp.rename(out)
        return out
    kept = [] if ours is None else [e.name for e in out.iterdir()
                                    if e.name != MARKER and not ours(e.name) and not (tmp / e.name).exists()]
    for name in kept:
        (out / name).rename(tmp / name)
    old = out.parent / f".{out.name}.old"
    try:
        _remove_ours(old)
        out.rename(old)
    except BaseException:
        for name in kept:
            (tmp / name).rename(out / name)
        raise
    (old / MARKER).write_text("the replaced output; removed once the new one is in place\n")
    try:
        tmp.rename(out)
    except BaseException:
        for name in kept:
            (tmp / name).rename(old / name)
        old.rename(out)
        (out / MARKER).unlink(missing_ok=True)
        raise
    shutil.rmtree(old)
    return out


def discard(tmp: Optional[Path]) -> None:
    """Remove a staging directory after a failure (only one this module made)."""
    if tmp is not None:
        _remove_ours(tmp)


def _remove_ours(path: Path) -> None:
    if not path.exists():
        return
    if not (path / MARKER).is_file():
        raise UserError(f"{path} exists but was not made by redi-megatron: move it away and rerun")
    shutil.rmtree(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: Union[str, bytes, Iterable[str]], *, fsync: bool = True) -> str:
    """Replace ``path`` with ``data`` (text, bytes, or an iterable of text chunks) atomically: a temporary
    file in the same directory (created if needed), flushed to disk, then renamed over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    binary = isinstance(data, bytes)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            if binary or isinstance(data, str):
                f.write(data)
            else:
                f.writelines(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
