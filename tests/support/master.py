"""Fakes for driving a ``Master`` in-process (see tests/unit/test_master_phases.py)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from echod.config import Config
from echod.pidfile import PidFile
from echod.scoreboard import Scoreboard, State, WorkerSlot
from echod.server.children import Children
from echod.server.listeners import Listener
from echod.server.master import Hooks, Master
from echod.server.phases import WorkerProcess


def fake_master(config: Config, board: Scoreboard, hooks: Hooks) -> Master:
    """A master with no listeners and fake children: it decides, the test acts."""
    return Master(
        config=config,
        listeners=[],
        scoreboard=board,
        load_config=lambda: config,
        pidfile=PidFile(f"{config.runtime_dir}/echod.pid"),
        hooks=hooks,
        children=FakeChildren(),
    )


@dataclass
class FakeChildren(Children):
    """Records what the master asks of the kernel; the test decides who exits."""

    next_pid: int = 1000
    forked: list[int] = field(default_factory=list)
    signals: list[tuple[int, signal.Signals]] = field(default_factory=list)
    exits: list[tuple[int, int]] = field(default_factory=list)

    def fork(
        self, keep: Sequence[Listener], body: object, *, failed: str, failure_code: int
    ) -> int:
        self.next_pid += 1
        self.forked.append(self.next_pid)
        return self.next_pid

    def kill(self, pid: int, signum: signal.Signals) -> None:
        self.signals.append((pid, signum))

    def reaped(self) -> Iterator[tuple[int, int]]:
        exits, self.exits = self.exits, []
        yield from exits

    def sent(self, signum: signal.Signals) -> list[int]:
        return [pid for pid, sig in self.signals if sig == signum]


def report(master: Master, state: State, *workers: WorkerProcess) -> None:
    """Play the workers' part: publish a state and a fresh heartbeat."""
    for worker in workers or tuple(master.workers.values()):
        slot = WorkerSlot(master.scoreboard, worker.slot)
        slot.set_state(state)
        slot.heartbeat(time.monotonic())


def started(master: Master, now: float | None = None) -> list[WorkerProcess]:
    """First tick, then every worker reports READY and the master notices."""
    now = time.monotonic() if now is None else now
    master._supervise(now)
    report(master, State.READY)
    master._supervise(now)
    return sorted(master.workers.values(), key=lambda w: w.worker_id)
