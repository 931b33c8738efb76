"""Nobody else may control the runtime directory: two real users, black-box.

User ``a`` runs echod (or echoctl) with its default runtime directory,
/tmp/echod-<uid of a>; user ``b`` is the other local user who got there first.
The users are created for the module (CI runs as root) and always removed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from support.echod import child_env, echod_command, run_echoctl

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    @property
    def default_runtime_dir(self) -> Path:
        return Path(f"/tmp/echod-{self.uid}")


def _kill_processes_of(uid: int) -> None:
    """Only what this module started as its throwaway users (found by uid)."""
    for process in psutil.process_iter(["uids"]):
        uids = process.info["uids"]
        if uids is not None and uids.real == uid:
            try:
                process.kill()
            except psutil.Error:
                pass


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[User, User]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (to create two users)")
    if shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("needs useradd and setpriv")
    tag = f"{os.getpid() % 100000}"
    created: list[User] = []
    try:
        for letter in "ab":
            name = f"echodt{tag}{letter}"
            subprocess.run(
                ["useradd", "--create-home", "--shell", "/bin/sh", name],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(name)
            created.append(User(name, entry.pw_uid, entry.pw_gid))
        yield created[0], created[1]
    finally:
        for user in created:
            _kill_processes_of(user.uid)
            _remove(user.default_runtime_dir)
            subprocess.run(["userdel", "--remove", user.name], capture_output=True)


@pytest.fixture
def a(users: tuple[User, User]) -> Iterator[User]:
    user = users[0]
    _remove(user.default_runtime_dir)
    yield user
    _kill_processes_of(user.uid)
    _remove(user.default_runtime_dir)


@pytest.fixture
def b(users: tuple[User, User]) -> Iterator[User]:
    yield users[1]
    _kill_processes_of(users[1].uid)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="echod-rundir-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(user: User) -> list[str]:
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--"]


def run_as(user: User, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = child_env({"HOME": f"/home/{user.name}", "USER": user.name, "LOGNAME": user.name})
    env.pop("XDG_RUNTIME_DIR", None)  # the default is then /tmp/echod-$UID
    return subprocess.run(
        [*as_user(user), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )


def echod_as(user: User, *args: str) -> subprocess.CompletedProcess[str]:
    return run_as(user, *echod_command(), "-F", "-w", "1", "-b", "127.0.0.1:0", *args)


def echoctl_as(user: User, *args: str) -> subprocess.CompletedProcess[str]:
    return run_as(user, sys.executable, "-m", "echod.ctl.main", *args)


def make_dir_as(user: User, path: Path, mode: int) -> None:
    path.mkdir()
    os.chown(path, user.uid, user.gid)
    path.chmod(mode)


def assert_refused(result: subprocess.CompletedProcess[str], reason: str) -> None:
    assert result.returncode == 77, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert reason in lines[0], lines[0]


def test_a_symlink_another_user_planted_as_the_default_dir_is_refused(
    a: User, b: User, scratch: Path
) -> None:
    theirs = scratch / "theirs"
    make_dir_as(b, theirs, 0o777)
    a.default_runtime_dir.symlink_to(theirs)
    os.chown(a.default_runtime_dir, b.uid, b.gid, follow_symlinks=False)
    refusal = f"refusing runtime directory {a.default_runtime_dir}: it is a symlink"
    assert_refused(echod_as(a), refusal)
    # as a daemon too, whose log would go there by default
    assert_refused(run_as(a, *echod_command(), "-w", "1", "-b", "127.0.0.1:0"), refusal)
    assert list(theirs.iterdir()) == []  # no pidfile, scoreboard or log went there


def test_a_default_dir_another_user_owns_is_refused(a: User, b: User) -> None:
    make_dir_as(b, a.default_runtime_dir, 0o755)
    result = echod_as(a)
    assert_refused(result, f"is owned by uid {b.uid}, not by uid {a.uid}")
    assert list(a.default_runtime_dir.iterdir()) == []


def test_a_dir_of_ours_others_may_write_to_is_refused(a: User, scratch: Path) -> None:
    make_dir_as(a, a.default_runtime_dir, 0o777)
    assert_refused(echod_as(a), "is writable by group or others (mode 0777)")
    explicit = scratch / "run"
    make_dir_as(a, explicit, 0o775)  # a configured --runtime-dir gets the same checks
    assert_refused(echod_as(a, "--runtime-dir", str(explicit)), "(mode 0775)")


def test_a_fresh_default_dir_is_created_0700_and_serves(a: User, b: User) -> None:
    launched = run_as(a, *echod_command(), "-w", "1", "-b", "127.0.0.1:0")  # a daemon
    assert launched.returncode == 0, launched.stderr
    info = a.default_runtime_dir.lstat()
    assert stat.S_ISDIR(info.st_mode)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (a.uid, 0o700)
    status = echoctl_as(a, "status")
    assert status.returncode == 0, status.stderr
    # The other user does not get to trust (or even read) it
    theirs = echoctl_as(b, "--runtime-dir", str(a.default_runtime_dir), "status")
    assert_refused(theirs, f"not trusting runtime directory {a.default_runtime_dir}")
    stopped = echoctl_as(a, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not (a.default_runtime_dir / "echod.pid").exists()


def test_echoctl_refuses_a_pidfile_in_a_dir_another_user_controls(a: User, b: User) -> None:
    make_dir_as(b, a.default_runtime_dir, 0o755)
    pidfile = a.default_runtime_dir / "echod.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # b aims a's `echoctl stop` at some process
    os.chown(pidfile, b.uid, b.gid)
    for verb in ("status", "stop"):
        result = echoctl_as(a, verb)
        assert_refused(result, f"not trusting runtime directory {a.default_runtime_dir}")


def _hold_pidfile_as(user: User, path: Path, pid: int) -> subprocess.Popen[str]:
    """``user`` locks ``path`` (as a live master would) and writes ``pid`` in it."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"os.write(fd, b'{pid}\\n')\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [*as_user(user), sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_root_trusts_a_users_dir_only_for_a_master_running_as_that_user(
    a: User, b: User, scratch: Path
) -> None:
    # systemd's DynamicUser= hands /run/echod to the service's user: root's
    # echoctl must work there, for echod running as that user...
    run = scratch / "run"
    make_dir_as(b, run, 0o755)
    launched = run_as(
        b, *echod_command(), "-w", "1", "-b", "127.0.0.1:0", "--runtime-dir", str(run)
    )
    assert launched.returncode == 0, launched.stderr
    assert run_echoctl("--runtime-dir", str(run), "status").returncode == 0
    stopped = run_echoctl("--runtime-dir", str(run), "stop")
    assert stopped.returncode == 0, stopped.stderr
    # ... but b cannot aim root's signals at a process that is not b's
    victim = subprocess.Popen(["sleep", "120"])
    holder = _hold_pidfile_as(b, run / "echod.pid", victim.pid)
    try:
        Path(run / "echod.scoreboard").unlink(missing_ok=True)
        result = run_echoctl("--runtime-dir", str(run), "stop")
        assert_refused(result, f"names pid {victim.pid} of uid 0, but its directory belongs")
        time.sleep(0.2)
        assert victim.poll() is None  # not signalled
    finally:
        holder.kill()
        holder.wait()
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def test_root_reuses_the_dir_it_handed_to_its_user(a: User, scratch: Path) -> None:
    run = scratch / "run"
    args = [*echod_command(), "-w", "1", "-b", "127.0.0.1:0", "--runtime-dir", str(run)]
    args += ["--user", a.name, "--log-file", str(scratch / "echod.log")]
    for _attempt in range(2):  # the second start finds the directory owned by a
        launched = subprocess.run(
            args,
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert launched.returncode == 0, launched.stderr
        assert run.stat().st_uid == a.uid
        status = run_echoctl("--runtime-dir", str(run), "status")
        assert status.returncode == 0, status.stderr
        stopped = run_echoctl("--runtime-dir", str(run), "stop")
        assert stopped.returncode == 0, stopped.stderr
