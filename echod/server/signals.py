"""Signals as a queue: handlers do nothing; the C-level handler writes the signal
number to a wakeup pipe (``signal.set_wakeup_fd``), and the owner's loop reads
the numbers back in order and handles them outside signal context.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Iterator


def _ignore_here(signum: int, frame: object) -> None:
    """The work happens in the loop that reads the wakeup pipe."""


class SignalQueue:
    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for signum in self.signals:
            signal.signal(signum, _ignore_here)

    def fileno(self) -> int:
        return self.read_fd

    def drain(self) -> list[signal.Signals]:
        """The signals received since the last drain, in arrival order."""
        received: list[signal.Signals] = []
        while True:
            try:
                data = os.read(self.read_fd, 4096)
            except BlockingIOError:
                break
            if not data:
                break
            for number in data:
                with contextlib.suppress(ValueError):
                    received.append(signal.Signals(number))
        return received

    def close(self) -> None:
        """Stop queueing (in a freshly forked child, before it installs its own)."""
        signal.set_wakeup_fd(-1)
        for signum in self.signals:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.read_fd)
        os.close(self.write_fd)


@contextlib.contextmanager
def blocked(signals: Iterable[signal.Signals]) -> Iterator[None]:
    """Block signals around fork() so the child can install handlers before any lands."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
