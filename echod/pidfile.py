"""The master's pidfile, locked with flock(2) for as long as the master lives.

The lock, not the file, says who runs: a pidfile nobody holds locked is stale
(LSB) and is taken over, so a crash never leaves echod unable to start, and
echoctl asks ``is_locked`` before trusting the pid it reads.

Why flock(2) and not fcntl/lockf record locks: a flock lock belongs to the open file
description, so it survives both ``fork()`` (the lock taken before daemonizing stays
with the daemon) and ``execve()`` of an inherited fd (the in-place upgrade), and it is
not silently dropped when the process closes some other fd of the same file, which a
POSIX record lock would be.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from echod.errors import AlreadyRunning, EchodError

_MAX_PID_BYTES = 32
# acquire() retries when the file it locked was unlinked (or replaced) meanwhile.
_ACQUIRE_ATTEMPTS = 5
# How long a failed acquire() waits for a just-started holder to write its pid.
_HOLDER_PID_WAIT_SECONDS = 0.5


class PidFile:
    """An flock-ed pidfile owned by the master process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PidFile({str(self.path)!r}, fd={self.fd})"

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        """Create, lock and write our pid; AlreadyRunning (exit 69) names the holder."""
        if self.fd is not None:
            return
        try:
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                self.path.parent.chmod(0o755)  # whatever the umask: echoctl must read it
        except OSError as exc:
            raise EchodError(
                f"cannot create the pidfile directory {self.path.parent}: {exc.strerror}"
            ) from exc
        for _attempt in range(_ACQUIRE_ATTEMPTS):
            fd = self._open_and_lock()
            if _same_file(fd, self.path):
                self.fd = fd
                with contextlib.suppress(PermissionError):  # someone else's stale file
                    os.fchmod(fd, 0o644)  # readable by echoctl, whatever the umask
                self.write(os.getpid())
                return
            # The previous holder removed the file between our open() and flock():
            # our lock is on an orphan inode. Start again on whatever is there now.
            os.close(fd)
        raise EchodError(f"cannot lock the pidfile {self.path}: it keeps being replaced")

    def _open_and_lock(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise EchodError(f"cannot open the pidfile {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(self._already_running_message()) from None
        except OSError as exc:
            os.close(fd)
            raise EchodError(f"cannot lock the pidfile {self.path}: {exc.strerror}") from exc
        return fd

    def _already_running_message(self) -> str:
        deadline = time.monotonic() + _HOLDER_PID_WAIT_SECONDS
        pid = read_pid(self.path)
        # The holder writes its pid right after locking; give it that moment.
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.02)
            pid = read_pid(self.path)
        shown = str(pid) if pid is not None else "unknown"
        return f"echod is already running (pid {shown}, pidfile {self.path})"

    def write(self, pid: int) -> None:
        """Rewrite the pid in place; again after daemonizing, whose pid differs."""
        fd = self._locked_fd()
        data = f"{pid}\n".encode()
        # Write first, then cut: a reader never sees an empty file, and read_pid()
        # only parses the first line, which is complete at every instant.
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)

    def release(self) -> None:
        """Remove the file if it is still ours (inode and pid), then unlock. Idempotent."""
        fd = self.fd
        if fd is None:
            return
        self.fd = None
        try:
            still_ours = _parse_pid(os.pread(fd, _MAX_PID_BYTES, 0)) == os.getpid()
            if still_ours and _same_file(fd, self.path):
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        finally:
            # Unlink before unlocking: nobody can lock the old inode in between.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def keep_across_exec(self) -> int:
        """Let the locked fd survive ``os.execv``; its number goes to the new image."""
        fd = self._locked_fd()
        os.set_inheritable(fd, True)
        return fd

    @classmethod
    def adopt(cls, path: str | os.PathLike[str], fd: int) -> PidFile:
        """In the re-executed master: wrap the inherited, still locked fd again."""
        pidfile = cls(path)
        try:
            is_ours = _same_file(fd, pidfile.path)
            if is_ours:
                # Re-locking a lock this open file description already holds succeeds;
                # someone else's lock would make it fail.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise EchodError(f"inherited pidfile fd {fd} is unusable: {exc.strerror}") from exc
        if not is_ours:
            raise EchodError(f"inherited pidfile fd {fd} is not {pidfile.path}")
        os.set_inheritable(fd, False)
        pidfile.fd = fd
        return pidfile

    def in_place(self) -> bool:
        """Whether our path still names the file we hold locked (nobody removed it)."""
        return self.fd is not None and _same_file(self.fd, self.path)

    def close_in_child(self) -> None:
        """In a forked child: close the inherited fd without touching lock or file."""
        # The lock stays with the master: it belongs to the shared open file
        # description, which the master still has open.
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _locked_fd(self) -> int:
        if self.fd is None:
            raise RuntimeError(f"pidfile {self.path} is not acquired")
        return self.fd


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the inode open at ``fd``."""
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _parse_pid(data: bytes) -> int | None:
    first_line = data.split(b"\n", 1)[0].strip()
    if not first_line.isdigit():
        return None
    pid = int(first_line)
    return pid if pid > 0 else None


def read_pid(path: str | os.PathLike[str]) -> int | None:
    """The pid written in ``path``, or None if it is missing, empty or garbage."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _parse_pid(os.read(fd, _MAX_PID_BYTES))
    finally:
        os.close(fd)


def is_locked(path: str | os.PathLike[str]) -> bool:
    """Whether a live process holds the lock on ``path`` (False if it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # also drops the shared lock we may just have taken
    return False
