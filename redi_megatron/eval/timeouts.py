"""Nestable SIGALRM deadlines for grading in worker processes.

math-verify and sympy can spin for minutes on adversarial answers. Their own timeout helpers call
``signal.alarm(0)`` on exit, which would silently cancel an outer per-answer alarm, so graders here
disable those and use this module instead: every ``deadline()`` pushes an absolute deadline on a
stack and the single ITIMER_REAL timer is always armed for the earliest one. When it fires, the
handler raises the exception type of the earliest expired deadline, so an inner 2 s sympy limit
raises an ``Exception`` the grader catches, while the outer per-answer limit raises
:class:`GradeTimeout` (a ``BaseException``) that passes through the libraries' ``except Exception``.

Signals are only delivered to the main thread, so ``deadline()`` is a no-op in other threads
(``grade()`` called from a thread runs without a time limit; the pool never uses threads).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

# Re-fire while an expired deadline is still on the stack: a library with a bare ``except:`` may
# swallow the first exception and keep computing.
_REFIRE_S = 0.25


class GradeTimeout(BaseException):
    """The per-answer time limit expired (BaseException so library ``except Exception`` misses it)."""


class InnerTimeout(Exception):
    """A nested, recoverable limit (e.g. one sympy simplify) expired."""


_stack: list[tuple[float, type[BaseException]]] = []
_previous_handler = None


def _arm() -> None:
    if not _stack:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    remaining = min(d for d, _ in _stack) - time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-4), _REFIRE_S)


def _on_alarm(signum, frame) -> None:  # noqa: ARG001
    now = time.monotonic()
    expired = [(d, exc) for d, exc in _stack if d <= now]
    if not expired:  # early tick after a re-arm: wait for the real deadline
        _arm()
        return
    # The earliest expiry belongs to the outermost limit that is over; honour it first.
    raise min(expired, key=lambda item: item[0])[1]("grading time limit exceeded")


@contextlib.contextmanager
def deadline(seconds: float | None, exc_type: type[BaseException] = GradeTimeout) -> Iterator[None]:
    """Raise ``exc_type`` inside the block once ``seconds`` of wall time have passed.

    ``None`` or ``<= 0`` disables the limit. Nested blocks keep the outer deadline in force.
    """
    if seconds is None or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    global _previous_handler
    if not _stack:
        _previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
    entry = (time.monotonic() + seconds, exc_type)
    _stack.append(entry)
    try:
        _arm()
        yield
    finally:
        _stack.remove(entry)
        if _stack:
            _arm()
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, _previous_handler or signal.SIG_DFL)
