"""Where each worker, and the master itself, is in its life: one phase each.

Two words are easy to mix up here. A worker *asks* to be replaced while it
keeps serving (past ``max_connections_per_child`` or over ``max_worker_memory``
it sets ``State.RETIRING`` on the scoreboard): that is ``REPLACING``. The
master *tells* a worker to go: ``DRAINING`` (SIGTERM, finish the connections)
or ``QUITTING`` (SIGQUIT, fast). The tables below are every move the master
makes; any other is a bug and raises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class IllegalTransition(RuntimeError):
    """A phase change the tables below do not allow: a bug in the master."""


class WorkerPhase(enum.Enum):
    BOOTING = "booting"  # forked; has not reported READY on the scoreboard yet
    SERVING = "serving"
    REPLACING = "replacing"  # still serving; starts draining once its successor serves
    DRAINING = "draining"  # told to stop gracefully (SIGTERM), until its deadline
    QUITTING = "quitting"  # told to stop fast (SIGQUIT), until its deadline
    KILLED = "killed"  # missed its deadline: SIGKILL sent, awaiting reap
    ABORTING = "aborting"  # hung (silent past worker_timeout): SIGABRT sent, SIGKILL follows

    @property
    def told_to_go(self) -> bool:
        """The master sent it away (its generation's count no longer includes it)."""
        return self in (WorkerPhase.DRAINING, WorkerPhase.QUITTING, WorkerPhase.KILLED)

    @property
    def settled(self) -> bool:
        """Nothing is due for it: the master may sleep a whole idle tick."""
        return self in (WorkerPhase.BOOTING, WorkerPhase.SERVING)


_W = WorkerPhase
WORKER_MOVES: dict[WorkerPhase, frozenset[WorkerPhase]] = {
    _W.BOOTING: frozenset({_W.SERVING, _W.REPLACING, _W.DRAINING, _W.QUITTING, _W.ABORTING}),
    _W.SERVING: frozenset({_W.REPLACING, _W.DRAINING, _W.QUITTING, _W.ABORTING}),
    _W.REPLACING: frozenset({_W.DRAINING, _W.QUITTING, _W.ABORTING}),
    # a fast stop overrides a graceful one; a worker that misses its deadline is killed
    _W.DRAINING: frozenset({_W.QUITTING, _W.KILLED, _W.ABORTING}),
    _W.QUITTING: frozenset({_W.KILLED, _W.ABORTING}),
    _W.KILLED: frozenset(),
    _W.ABORTING: frozenset(),
}


@dataclass
class WorkerProcess:
    """The master's record of one worker (the scoreboard holds what the worker says)."""

    pid: int
    worker_id: int
    generation: int
    started: float
    phase: WorkerPhase = WorkerPhase.BOOTING
    deadline: float = 0.0  # DRAINING/QUITTING: kill after; ABORTING: SIGKILL after
    # Sent away before it hung or was killed: its exit is expected, not a crash.
    dismissed: bool = False

    @property
    def slot(self) -> int:
        return self.worker_id - 1

    def move(self, to: WorkerPhase, deadline: float = 0.0) -> None:
        if to not in WORKER_MOVES[self.phase]:
            raise IllegalTransition(f"worker {self.worker_id}: {self.phase.name} -> {to.name}")
        self.phase = to
        self.deadline = deadline
        if to.told_to_go:
            self.dismissed = True


class MasterPhase(enum.Enum):
    RUNNING = "running"
    RELOADING = "reloading"  # HUP: a new generation boots; the old one drains once it serves
    ADOPTING = "adopting"  # after an in-place upgrade: the same, for the adopted workers
    SHUTTING_DOWN = "shutting down"  # TERM with shutdown_delay: not ready, still serving
    STOPPING = "stopping"  # listeners closed; leaves when the last worker is reaped

    @property
    def switching(self) -> bool:
        """A generation switch is under way."""
        return self in (MasterPhase.RELOADING, MasterPhase.ADOPTING)


_M = MasterPhase
MASTER_MOVES: dict[MasterPhase, frozenset[MasterPhase]] = {
    _M.RUNNING: frozenset({_M.RELOADING, _M.ADOPTING, _M.SHUTTING_DOWN, _M.STOPPING}),
    # a HUP during a switch starts yet another generation, and counts as a reload
    _M.RELOADING: frozenset({_M.RUNNING, _M.RELOADING, _M.SHUTTING_DOWN, _M.STOPPING}),
    _M.ADOPTING: frozenset({_M.RUNNING, _M.RELOADING, _M.SHUTTING_DOWN, _M.STOPPING}),
    # workers keep serving (and are replaced) until the delay ends or INT/QUIT comes
    _M.SHUTTING_DOWN: frozenset({_M.STOPPING}),
    _M.STOPPING: frozenset(),
}


def check_master_move(now: MasterPhase, to: MasterPhase) -> MasterPhase:
    if to not in MASTER_MOVES[now]:
        raise IllegalTransition(f"master: {now.name} -> {to.name}")
    return to
