"""Finding the running master: the pidfile (and its lock) says who, the scoreboard
beside it says what. Nothing here scans system-wide tables, so it stays fast on a
host with 100k sockets.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import psutil

from echod import rundir
from echod.config import default_runtime_dir
from echod.errors import EchodError, UnsafeRuntimeDir
from echod.pidfile import is_locked, read_pid
from echod.scoreboard import Scoreboard, scoreboard_path

# LSB exit codes for status, reused by the control verbs (running is exitcodes.OK)
DEAD_WITH_PIDFILE = 1
NOT_RUNNING = 3


class NotRunning(EchodError):
    """No master runs; `stale` if a pidfile was left behind."""

    def __init__(self, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale
        self.exit_code = DEAD_WITH_PIDFILE if stale else NOT_RUNNING


def pidfile_path(args: argparse.Namespace) -> str:
    pidfile = getattr(args, "pidfile", None)
    if pidfile:
        return str(pidfile)
    runtime_dir = getattr(args, "runtime_dir", None) or default_runtime_dir()
    return os.path.join(runtime_dir, "echod.pid")


@dataclass
class RunningMaster:
    pid: int
    pidfile: str
    scoreboard: Scoreboard

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def alive(self) -> bool:
        try:
            return self.process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def find_master(args: argparse.Namespace) -> RunningMaster:
    """The live master, or NotRunning (stale pidfile: exit 1; none: exit 3)."""
    path = pidfile_path(args)
    owner = _check_directory(os.path.dirname(os.path.abspath(path)))
    pid = read_pid(path)
    if pid is None and not os.path.exists(path):
        raise NotRunning(f"echod is not running (no pidfile {path})")
    if pid is None or not is_locked(path) or not psutil.pid_exists(pid):
        raise NotRunning(
            f"echod is not running, but its pidfile {path} remains (pid {pid or '?'} is gone)",
            stale=True,
        )
    if owner is not None:
        _check_master_runs_as(owner, pid, path)
    try:
        scoreboard = Scoreboard.attach(scoreboard_path(path), writable=False)
    except (OSError, ValueError) as exc:
        raise EchodError(
            f"echod (pid {pid}) runs, but its scoreboard is unreadable: {exc}"
        ) from None
    return RunningMaster(pid, path, scoreboard)


def _check_directory(directory: str) -> int | None:
    """Refuse (exit 77) a pidfile directory someone else could control, as echod does.

    Root may read one owned by another user (systemd's DynamicUser= hands
    /run/echod to the service's user): the uid returned is that owner's, and
    its pidfile is trusted only for a master that runs as that same user.
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None  # no pidfile either: not running
    except OSError as exc:
        raise EchodError(f"cannot inspect runtime directory {directory}: {exc.strerror}") from None
    euid = os.geteuid()
    extra = [st.st_uid] if euid == 0 else []
    reason = rundir.problem(st, euid, extra)
    if reason is not None:
        raise UnsafeRuntimeDir(
            f"not trusting runtime directory {directory}: it {reason} (it must be yours alone)"
        )
    return st.st_uid if st.st_uid not in (euid, 0) else None


def _check_master_runs_as(owner: int, pid: int, path: str) -> None:
    try:
        uids = psutil.Process(pid).uids()
    except psutil.Error:
        raise NotRunning(
            f"echod is not running, but its pidfile {path} remains", stale=True
        ) from None
    if uids.real != owner:
        raise UnsafeRuntimeDir(
            f"not trusting pidfile {path}: it names pid {pid} of uid {uids.real},"
            f" but its directory belongs to uid {owner}"
        )
