"""Pidfile locked with flock for the master's life (placeholder until the daemon layer lands)."""

from __future__ import annotations

import contextlib
import fcntl
import os

from echod.errors import AlreadyRunning, EchodError


class PidFile:
    def __init__(self, path: str, fd: int = -1) -> None:
        self.path = path
        self.fd = fd

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o755, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise EchodError(f"cannot open pidfile {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = read_pid(self.path)
            os.close(fd)
            raise AlreadyRunning(
                f"echod is already running (pid {pid}, pidfile {self.path})") from None
        self.fd = fd

    def write(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        if read_pid(self.path) == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1

    def keep_across_exec(self) -> int:
        os.set_inheritable(self.fd, True)
        return self.fd

    @classmethod
    def adopt(cls, path: str, fd: int) -> PidFile:
        os.set_inheritable(fd, False)
        return cls(path, fd)


def read_pid(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip() or 0) or None
    except (OSError, ValueError):
        return None
