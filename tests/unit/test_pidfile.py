"""PidFile: flock held for the master's life, across fork (daemonize) and execv (upgrade)."""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod import exitcodes
from echod.errors import AlreadyRunning, EchodError
from echod.pidfile import PidFile, is_locked, read_pid

LINE_TIMEOUT_SECONDS = 30.0

# Acquires the pidfile, says "locked <pid>", and waits for a command on stdin:
# "release" (clean), "crash" (exit without releasing: a stale pidfile), or
# "exec" (keep the fd across os.execv into ADOPTER, in the same pid).
HOLDER = r"""
import os, sys
from echod.pidfile import PidFile
path, adopter = sys.argv[1], sys.argv[2]
pidfile = PidFile(path)
pidfile.acquire()
print("locked", os.getpid(), flush=True)
command = sys.stdin.readline().strip()
if command == "release":
    pidfile.release()
elif command == "exec":
    fd = pidfile.keep_across_exec()
    os.execv(sys.executable, [sys.executable, "-c", adopter, path, str(fd)])
os._exit(0)
"""

# The re-executed image: adopts the inherited fd, proves it holds the lock and that
# the fd is close-on-exec again, then waits for "release".
ADOPTER = r"""
import fcntl, os, sys
from echod.pidfile import PidFile
path, fd = sys.argv[1], int(sys.argv[2])
pidfile = PidFile.adopt(path, fd)
cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
print("adopted", os.getpid(), "cloexec" if cloexec else "inheritable", flush=True)
if sys.stdin.readline().strip() == "release":
    pidfile.release()
os._exit(0)
"""

# Acquires in one process, forks, and the parent exits at once without releasing
# (python-daemon's detach): the child must still hold the lock, then write its pid.
FORKER = r"""
import os, sys
from echod.pidfile import PidFile
pidfile = PidFile(sys.argv[1])
pidfile.acquire()
if os.fork() > 0:
    os._exit(0)
pidfile.write(os.getpid())
print("child", os.getpid(), flush=True)
sys.stdin.readline()
pidfile.release()
"""


class Holder:
    """A subprocess running HOLDER or FORKER; always killed and reaped by the fixture."""

    def __init__(self, script: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read_line(self) -> list[str]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], LINE_TIMEOUT_SECONDS)
        assert ready, "holder said nothing"
        line = self.process.stdout.readline()
        assert line, f"holder exited with {self.process.wait(LINE_TIMEOUT_SECONDS)}"
        return line.split()

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def wait(self) -> int:
        return self.process.wait(LINE_TIMEOUT_SECONDS)


@pytest.fixture
def spawn() -> Iterator[type[Holder]]:
    started: list[Holder] = []

    class TrackedHolder(Holder):
        def __init__(self, script: str, *args: str) -> None:
            super().__init__(script, *args)
            started.append(self)

    yield TrackedHolder
    for holder in started:
        if holder.process.poll() is None:
            holder.process.kill()
        holder.process.wait(LINE_TIMEOUT_SECONDS)
        for stream in (holder.process.stdin, holder.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "echod" / "echod.pid"


def wait_until_unlocked(path: Path) -> None:
    deadline = time.monotonic() + LINE_TIMEOUT_SECONDS
    while is_locked(path):
        assert time.monotonic() < deadline, f"{path} still locked"
        time.sleep(0.02)


def test_acquire_writes_our_pid_and_release_removes_it(path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        pidfile = PidFile(path)
        pidfile.acquire()
    finally:
        os.umask(old_umask)
    try:
        assert path.read_text() == f"{os.getpid()}\n"
        assert read_pid(path) == os.getpid()
        assert is_locked(path)  # a second open file description conflicts, even here
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert pidfile.fd is not None
        assert not os.get_inheritable(pidfile.fd)
        pidfile.write(123456)
        assert path.read_text() == "123456\n"
        pidfile.write(os.getpid())
        assert path.read_text() == f"{os.getpid()}\n"  # shorter rewrite leaves no tail
    finally:
        pidfile.release()
    assert not path.exists()
    assert not is_locked(path)
    pidfile.release()  # idempotent


def test_context_manager(path: Path) -> None:
    with PidFile(path) as pidfile:
        assert pidfile.held
        assert is_locked(path)
    assert not pidfile.held
    assert not path.exists()


def test_second_acquire_in_another_process_names_the_holder(
    path: Path, spawn: type[Holder]
) -> None:
    holder = spawn(HOLDER, str(path), ADOPTER)
    word, pid = holder.read_line()
    assert word == "locked"
    with pytest.raises(AlreadyRunning) as raised:
        PidFile(path).acquire()
    assert str(raised.value) == f"echod is already running (pid {pid}, pidfile {path})"
    assert raised.value.exit_code == exitcodes.UNAVAILABLE
    assert read_pid(path) == int(pid)  # the loser did not touch the file
    holder.tell("release")
    assert holder.wait() == 0
    assert not path.exists()


def test_stale_pidfile_of_a_crashed_master_is_taken_over(path: Path, spawn: type[Holder]) -> None:
    holder = spawn(HOLDER, str(path), ADOPTER)
    _, dead_pid = holder.read_line()
    holder.tell("crash")
    assert holder.wait() == 0
    assert read_pid(path) == int(dead_pid)  # left behind...
    assert not is_locked(path)  # ...but stale: nobody holds the lock
    with PidFile(path):
        assert read_pid(path) == os.getpid()


def test_stale_pidfile_with_garbage_is_taken_over(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("not a pid at all, and rather long, longer than any pid\n")
    assert read_pid(path) is None
    with PidFile(path):
        assert path.read_text() == f"{os.getpid()}\n"


def test_release_leaves_a_file_that_is_no_longer_ours(path: Path) -> None:
    pidfile = PidFile(path)
    pidfile.acquire()
    pidfile.write(os.getpid() + 1)  # e.g. the daemon forgot to write its own pid
    pidfile.release()
    assert read_pid(path) == os.getpid() + 1
    assert not is_locked(path)


def test_release_leaves_a_replacement_file_alone(path: Path) -> None:
    pidfile = PidFile(path)
    pidfile.acquire()
    path.unlink()  # an operator removed it, and something else wrote a new one
    path.write_text(f"{os.getpid()}\n")
    pidfile.release()
    assert path.read_text() == f"{os.getpid()}\n"


def test_the_lock_survives_execv_in_the_same_pid(path: Path, spawn: type[Holder]) -> None:
    holder = spawn(HOLDER, str(path), ADOPTER)
    _, pid = holder.read_line()
    holder.tell("exec")
    assert holder.read_line() == ["adopted", pid, "cloexec"]
    assert holder.process.pid == int(pid)  # same pid: that is the point
    assert is_locked(path)
    with pytest.raises(AlreadyRunning, match=f"pid {pid},"):
        PidFile(path).acquire()
    # And from an unrelated process too, not just this one.
    contender = subprocess.run(
        [sys.executable, "-c", "import sys; from echod.pidfile import PidFile;"
         " PidFile(sys.argv[1]).acquire()", str(path)],
        capture_output=True, text=True, timeout=LINE_TIMEOUT_SECONDS,
    )  # fmt: skip
    assert contender.returncode != 0
    assert f"echod is already running (pid {pid}" in contender.stderr
    holder.tell("release")
    assert holder.wait() == 0
    assert not path.exists()


def test_the_lock_survives_the_fork_of_daemonizing(path: Path, spawn: type[Holder]) -> None:
    forker = spawn(FORKER, str(path))
    word, child_pid = forker.read_line()
    assert word == "child"
    assert forker.wait() == 0  # the parent is gone, without releasing
    assert is_locked(path)
    assert read_pid(path) == int(child_pid)
    forker.tell("done")  # the child shares the stdin pipe
    wait_until_unlocked(path)
    assert not path.exists()


def test_close_in_child_keeps_the_parents_lock(path: Path) -> None:
    with PidFile(path) as pidfile:
        worker = os.fork()
        if worker == 0:
            pidfile.close_in_child()
            os._exit(0 if pidfile.fd is None else 1)
        _, status = os.waitpid(worker, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert is_locked(path)
        assert read_pid(path) == os.getpid()


def test_adopt_rejects_an_fd_of_another_file(path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("x")
    fd = os.open(other, os.O_RDONLY)
    try:
        with pytest.raises(EchodError, match="is not"):
            PidFile.adopt(path, fd)
    finally:
        os.close(fd)


def test_unusable_location_is_an_error_not_already_running(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EchodError) as raised:
        PidFile(blocker / "echod.pid").acquire()
    assert not isinstance(raised.value, AlreadyRunning)
    assert str(blocker) in str(raised.value)


def test_helpers_on_missing_file(tmp_path: Path) -> None:
    assert read_pid(tmp_path / "missing.pid") is None
    assert not is_locked(tmp_path / "missing.pid")
