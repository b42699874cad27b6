"""Lines a user reads, once per job: under torchrun every rank runs the same code, so a start-up warning,
an error every rank hits or the final "done" would otherwise be printed once per rank (issue 24).

The rank is the launcher's ``RANK`` (torchrun sets it; a lone process has none and is rank 0), read from
the environment so it holds before process groups exist and after they are torn down. Standard library
only, so every layer may use it.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, TextIO


def global_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def first_rank() -> bool:
    """True on global rank 0 (and in a process not started by a launcher)."""
    return global_rank() == 0


def say(message: str, stream: Optional[TextIO] = None) -> None:
    """Print ``message`` (default: to stderr) on global rank 0 only."""
    if first_rank():
        print(message, file=stream if stream is not None else sys.stderr, flush=True)
