"""Preemption: the one place that handles stop signals for a training run.

SIGTERM (Slurm's and torchrun's stop) and an early-warning signal (``#SBATCH --signal=B:USR1@120``) only
set a flag. The trainer finishes the step in flight, all ranks agree through an all-reduce max of the flag
(a rank that got no signal still stops at the same step), saves a complete checkpoint of that step, writes
``<save_dir>/preempted.json`` and exits with :data:`EXIT_PREEMPTED` (75, EX_TEMPFAIL) so that Slurm's
``--requeue`` (or the user) starts it again and it resumes from that checkpoint. Once the save has begun,
further signals are ignored: a second SIGTERM must not kill the save halfway (the checkpoint is written
beside the old one and swapped in when complete, so even a SIGKILL leaves the last good one chosen).
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

from redi_megatron.errors import UserError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; Slurm requeues with --requeue


def _parse(names: list[str] | tuple[str, ...]) -> list[signal.Signals]:
    out = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        try:
            out.append(signal.Signals[key])
        except KeyError:
            raise UserError(f"train.preempt_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)") from None
        if out[-1] in (signal.SIGKILL, signal.SIGSTOP):
            raise UserError(f"train.preempt_signals: {name} cannot be caught")
    return out


class Preemption:
    """Installs the handlers for ``signals`` on :meth:`install`; :meth:`requested` is the local flag."""

    def __init__(self, signals: list[str] | tuple[str, ...]):
        self.signals = _parse(signals)
        self.received: Optional[str] = None
        self._previous: dict[signal.Signals, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> "Preemption":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def ignore(self) -> None:
        """From here on (the final save) stop signals are ignored: the save must finish."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def requested(self) -> bool:
        return self.received is not None


def write_marker(save_dir: str, step: int, received: Optional[str], checkpoint: str) -> str:
    """``preempted.json``: which step was saved and why (written beside, then renamed into place)."""
    path = os.path.join(save_dir, "preempted.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "signal": received, "checkpoint": checkpoint,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "exit_code": EXIT_PREEMPTED}, f, indent=1)
    os.replace(tmp, path)
    return path
