"""SIGTERM as a request to stop at the next safe point, not as a crash.

Eviction, preemption and `kubectl delete` send SIGTERM and wait the grace period before SIGKILL.
Python's default handler dies at once, leaving the partial checkpoint on the volume and no termination
message. Inside `handled()`, SIGTERM only records that it arrived; `check()` raises Terminated where
stopping is safe (between tensors and layers, before the rename into place), and the checkpoint writer
removes its partial output as the exception unwinds through it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Terminated(Exception):
    """SIGTERM arrived; raised at a safe point."""


_received: list[int] = []


def _record(signum: int, frame: object) -> None:
    _received.append(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGTERM recorded, not fatal, for the duration (main thread only, as Python's signals are)."""
    _received.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _record)
    except ValueError:  # not the main thread: leave the process's handling as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _received.clear()


def requested() -> bool:
    return bool(_received)


def check(progress: str) -> None:
    """Raise Terminated, saying how far the work got, when SIGTERM has arrived."""
    if _received:
        raise Terminated(f"terminated by SIGTERM {progress}")
