"""Finding the running master: the pidfile (and its lock) says who, the scoreboard
beside it says what. Nothing here scans system-wide tables, so it stays fast on a
host with 100k sockets.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import psutil

from echod.config import default_runtime_dir
from echod.errors import EchodError
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
    pid = read_pid(path)
    if pid is None and not os.path.exists(path):
        raise NotRunning(f"echod is not running (no pidfile {path})")
    if pid is None or not is_locked(path) or not psutil.pid_exists(pid):
        raise NotRunning(
            f"echod is not running, but its pidfile {path} remains (pid {pid or '?'} is gone)",
            stale=True,
        )
    try:
        scoreboard = Scoreboard.attach(scoreboard_path(path), writable=False)
    except (OSError, ValueError) as exc:
        raise EchodError(
            f"echod (pid {pid}) runs, but its scoreboard is unreadable: {exc}"
        ) from None
    return RunningMaster(pid, path, scoreboard)
