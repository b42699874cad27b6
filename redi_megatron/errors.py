"""``UserError``: a problem the user can fix (a config value, a path, a data file), as opposed to a bug.

Raised where inputs are checked; the command-line tools catch only this and print it as one line with
exit status 2. Anything else (a broken invariant, a bug) keeps its traceback. A subclass of
``ValueError``, so library callers that catch ``ValueError`` keep working. Standard library only.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix; the message names the file, row, flag or key."""


class MissingDependency(UserError, ImportError):
    """An optional package a requested feature needs is not installed (the message says how to get it)."""


class SharedError(UserError):
    """A UserError every rank raises from one decision broadcast by rank 0 (a held lock, a damaged
    checkpoint): ``redi-train`` under torchrun prints it once, not once per rank."""
