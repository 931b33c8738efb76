"""In-place upgrade (USR2): the master re-executes itself in the same pid.

1. Pre-flight: run the installed code's ``--check-config`` with the master's own
   arguments in a child. If the new code or the config does not load, nothing
   changes.
2. Hand-off: listening sockets, the pidfile (its lock lives on the open file, so
   it survives exec), the master-alive pipe and the table of running workers are
   passed to the new image through inheritable fds and one environment variable.
3. ``execv``: same pid, so systemd's MainPID, the pidfile and a container
   runtime see no change; the old workers remain our children and are adopted,
   then retired gracefully once the new generation serves.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from echod.system.systemd import SYSTEMD_CHILD_VARIABLES

HANDOFF_ENV = "_ECHOD_UPGRADE"  # not ECHOD_*: that prefix is for config keys
# Where echod was started: relative paths in its arguments are relative to it. A
# daemon lives in /, so the pre-flight and the new image run from here instead.
LAUNCH_DIRECTORY = os.getcwd()
PREFLIGHT_TIMEOUT = 30.0


def program_argv() -> list[str]:
    """How to start the installed echod again with this master's arguments."""
    return [sys.executable, "-m", "echod", *sys.argv[1:]]


@dataclass
class AdoptedWorker:
    pid: int
    worker_id: int
    generation: int
    retiring: bool = False


@dataclass
class Handoff:
    listener_fds: dict[str, int]  # configured address -> fd
    pidfile_fd: int
    alive_read: int
    alive_write: int
    generation: int
    desired: int
    workers: list[AdoptedWorker] = field(default_factory=list)
    activated: list[str] = field(default_factory=list)  # systemd's sockets, by address
    metrics_bind: str = ""  # the metrics endpoint's socket, if one is open
    metrics_fd: int = -1

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> Handoff:
        data = json.loads(text)
        data["workers"] = [AdoptedWorker(**w) for w in data["workers"]]
        return cls(**data)


def take_handoff() -> Handoff | None:
    """In a freshly exec'd master: the state its previous image left, if any."""
    text = os.environ.pop(HANDOFF_ENV, None)
    if not text:
        return None
    return Handoff.decode(text)


@dataclass
class Preflight:
    """A `--check-config` run of the installed code, watched from the master's loop."""

    pid: int
    output_fd: int
    started: float
    output: bytearray = field(default_factory=bytearray)
    status: int | None = None

    @classmethod
    def start(cls, now: float) -> Preflight:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, write_fd, 1),
            (os.POSIX_SPAWN_DUP2, write_fd, 2),
        ]
        env = {k: v for k, v in os.environ.items()
               if k != HANDOFF_ENV and k not in SYSTEMD_CHILD_VARIABLES}
        here = os.getcwd()
        try:
            os.chdir(LAUNCH_DIRECTORY)
            pid = os.posix_spawn(sys.executable, [*program_argv(), "--check-config"], env,
                                 file_actions=actions, setsigdef=(signal.SIGTERM,
                                                                  signal.SIGINT))
        finally:
            os.chdir(here)
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        return cls(pid, read_fd, now)

    def collect_output(self) -> None:
        while len(self.output) < 65536:
            try:
                chunk = os.read(self.output_fd, 4096)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.output += chunk

    def finish(self, status: int) -> None:
        self.status = status
        self.collect_output()
        os.close(self.output_fd)

    @property
    def succeeded(self) -> bool:
        return self.status is not None and os.WIFEXITED(self.status) and \
            os.WEXITSTATUS(self.status) == 0

    @property
    def summary(self) -> str:
        text = self.output.decode(errors="replace").strip().replace("\n", " | ")
        return text or "no output"


def exec_new_image(handoff: Handoff, keep_fds: Iterable[int],
                   blocked_signals: Iterable[signal.Signals]) -> None:
    """Replace this process image; returns only if exec failed (then nothing changed)."""
    fds = list(keep_fds)
    for fd in fds:
        os.set_inheritable(fd, True)
    env = dict(os.environ)
    env[HANDOFF_ENV] = handoff.encode()
    # Signals stay blocked across exec (the mask is inherited), so one arriving
    # before the new image installs its handlers waits instead of killing us.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked_signals)
    here = os.getcwd()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(LAUNCH_DIRECTORY)
        os.execve(sys.executable, program_argv(), env)
    except OSError:
        os.chdir(here)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for fd in fds:
            os.set_inheritable(fd, False)
        raise
