"""The master's children, from fork to reap, the same way for every kind.

Every child (worker or helper process) is forked through ``Children.fork`` and
goes through ``after_fork_in_child`` before its own code runs, so that no child
keeps by accident what only the master may hold: the signal queue, the write end
of the master-alive pipe (its EOF is how children learn the master died), the
pidfile, a readiness pipe, and every socket that is not its own.

``Children`` is also the only place the master asks the kernel about its
children (fork, kill, waitpid), so in-process tests hand the master a fake.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from echod.config import Config
from echod.scoreboard import Scoreboard
from echod.server.listeners import Listener
from echod.server.signals import SignalQueue, blocked
from echod.system.oom import raise_own_oom_score

log = logging.getLogger("echod.master")

MASTER_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


@dataclass
class Inheritance:
    """What a forked child inherits from the master and must put down first."""

    signals: SignalQueue
    alive_read: int  # children keep this end: EOF means the master is gone
    alive_write: int
    master_pid: int
    close_in_child: Callable[[], None]  # the layers around the master (pidfile, readiness)
    sockets: Callable[[], list[Listener]]  # every socket the master holds right now


def after_fork_in_child(inherited: Inheritance, keep: Sequence[Listener]) -> None:
    """In every freshly forked child, before its own code: drop the master's things,
    and volunteer to the OOM killer before the master (a child is replaced in a second)."""
    raise_own_oom_score()
    inherited.signals.close()
    os.close(inherited.alive_write)
    inherited.close_in_child()
    kept = {id(listener) for listener in keep}
    for listener in inherited.sockets():
        if id(listener) not in kept:
            listener.sock.close()  # not Listener.close(): the unix socket file stays the master's


@dataclass
class Children:
    """fork / kill / reap for the master; the seam its unit tests replace."""

    inherited: Inheritance | None = None  # set by Master.open(), before the first fork

    def fork(
        self,
        keep: Sequence[Listener],
        body: Callable[[], object],
        *,
        failed: str,
        failure_code: int,
    ) -> int:
        """Start ``body`` in a child that keeps only the sockets in ``keep``; return its pid.

        The child exits 0 when ``body`` returns; when it raises, it logs ``failed``
        with the traceback and exits ``failure_code``.
        """
        assert self.inherited is not None, "Master.open() comes before the first fork"
        # Signals stay blocked across fork() so none is lost or handled by the
        # master's handlers in the child before the child installs its own.
        with blocked(MASTER_SIGNALS):
            pid = os.fork()
            if pid == 0:
                code = failure_code
                try:
                    after_fork_in_child(self.inherited, keep)
                    body()
                    code = 0
                except BaseException:
                    log.exception("%s", failed)
                logging.shutdown()
                os._exit(code)
        return pid

    def kill(self, pid: int, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def reaped(self) -> Iterator[tuple[int, int]]:
        """(pid, status) of every child that has exited, without waiting."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            yield pid, status

    def stop_now(self, pid: int, patience: float = 1.0) -> None:
        """TERM, wait up to ``patience`` seconds, then KILL; reaps the child either way."""
        self.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + patience
        while not _reaped(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not _reaped(pid):
            self.kill(pid, signal.SIGKILL)
            _reaped(pid, wait=True)


def _reaped(pid: int, wait: bool = False) -> bool:
    try:
        done, _ = os.waitpid(pid, 0 if wait else os.WNOHANG)
    except ChildProcessError:
        return True  # already reaped (by the master's loop)
    return done == pid


def describe_exit(status: int) -> str:
    """A wait status in words: "exited", "exited with code 3", "was killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by {name}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    return "exited" if code == 0 else f"exited with code {code}"


@dataclass
class RestartBackoff:
    """Restarting a child that keeps dying young: wait longer each time, up to a cap.

    A child that dies younger than ``young`` was probably failing at boot; one
    that lived longer resets the count.
    """

    young: float = 5.0
    first: float = 0.1
    cap: float = 10.0
    failures: int = 0  # young deaths in a row
    not_before: float = 0.0  # no restart before this (monotonic)

    def died(self, now: float, lived: float, *, blameless: bool = False) -> float:
        """Record a death after ``lived`` seconds; return the delay before the next start.

        ``blameless``: the child did not fail by itself (we killed it, e.g. when
        hung), so like a long life it resets the count.
        """
        if not blameless and lived < self.young:
            self.failures += 1
            delay = min(self.first * 2 ** (self.failures - 1), self.cap)
            self.not_before = now + delay
            return delay
        self.failures = 0
        self.not_before = 0.0
        return 0.0

    def may_start(self, now: float) -> bool:
        return now >= self.not_before


class Helper(Protocol):
    """A process the master keeps running beside the workers (the metrics endpoint)."""

    name: str  # its key in the upgrade hand-off

    def attach(self, children: Children, scoreboard: Scoreboard) -> None:
        """Once, before the first fork: how to start its process, and what it may read."""

    def supervise(self, config: Config, stopping: bool, now: float) -> None:
        """Every loop iteration: start (or restart) the process when needed."""

    def child_exited(self, pid: int, status: int) -> bool:
        """A child that is not a worker was reaped; return True if it was ours."""
        return False

    def sockets(self) -> list[Listener]:
        """Sockets it holds: no other child keeps them; daemonizing keeps them open."""
        return []

    def handoff_fds(self) -> dict[str, int]:
        """Its sockets (address -> fd) to hand over across an in-place upgrade."""
        return {}

    def before_exec(self) -> None:
        """The master is about to re-execute itself: stop the helper's process."""

    def stop(self) -> None:
        """The master is leaving."""
