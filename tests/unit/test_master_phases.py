"""The master's decisions, in-process: whom to spawn, retire, kill, back off.

A ``Master`` is built with a fake ``Children`` (no fork, no kill, no waitpid)
and a real scoreboard file, on which the tests play the workers' part
(READY, RETIRING, heartbeats). Time is whatever ``now`` the test passes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from support.master import FakeChildren, fake_master, report, started

from echod import exitcodes
from echod.addresses import parse_address
from echod.config import MAX_WORKERS, Config
from echod.scoreboard import MasterCounter, MasterStatus, Scoreboard, State
from echod.server import master as master_module
from echod.server import upgrade as upgrade_module
from echod.server.children import (
    Inheritance,
    RestartBackoff,
    after_fork_in_child,
    describe_exit,
)
from echod.server.listeners import Listener, ListenerChange
from echod.server.master import ABORT_GRACE, BUSY_TICK, IDLE_TICK, Hooks, Master
from echod.server.phases import (
    IllegalTransition,
    MasterPhase,
    WorkerPhase,
    WorkerProcess,
    check_master_move,
)
from echod.server.upgrade import AdoptedWorker, Handoff, Preflight

BOOT_FATAL = exitcodes.WORKER_BOOT_FATAL << 8  # wait statuses, as waitpid reports them
CRASHED = 1 << 8


@dataclass
class Heard:
    ready: int = 0
    reloading: int = 0
    stopping: int = 0
    shutting_down: int = 0

    def hooks(self) -> Hooks:
        def count(name: str) -> Callable[[Master], None]:
            return lambda master: setattr(self, name, getattr(self, name) + 1)

        return Hooks(
            on_ready=count("ready"),
            on_reloading=count("reloading"),
            on_stopping=count("stopping"),
            on_shutting_down=count("shutting_down"),
        )


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Scoreboard]:
    scoreboard = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    yield scoreboard
    scoreboard.unlink()


@pytest.fixture
def heard() -> Heard:
    return Heard()


@pytest.fixture
def make_master(tmp_path: Path, board: Scoreboard, heard: Heard):
    def make(workers: int = 2, **settings: object) -> Master:
        config = Config(
            workers=workers,
            runtime_dir=str(tmp_path),
            graceful_timeout=5.0,
            worker_timeout=10.0,
            **settings,
        )  # type: ignore[arg-type]
        return fake_master(config, board, heard.hooks())

    return make


def fake(master: Master) -> FakeChildren:
    assert isinstance(master.children, FakeChildren)
    return master.children


def exit_(master: Master, worker: WorkerProcess, status: int) -> None:
    fake(master).exits.append((worker.pid, status))
    master._reap()


# -- construction ------------------------------------------------------------------------


def test_building_a_master_opens_nothing_and_forks_nothing(make_master) -> None:
    master = make_master()
    assert master.signals is None and master.alive_read == -1
    assert fake(master).forked == [] and master.workers == {}
    assert master.phase is MasterPhase.RUNNING


# -- spawning and readiness --------------------------------------------------------------


def test_first_tick_starts_the_configured_workers_booting(make_master, board) -> None:
    master = make_master(workers=3)
    master._supervise(time.monotonic())
    workers = sorted(master.workers.values(), key=lambda w: w.worker_id)
    assert [w.worker_id for w in workers] == [1, 2, 3]
    assert all(w.phase is WorkerPhase.BOOTING for w in workers)
    assert [board.slot(w.slot).pid for w in workers] == fake(master).forked
    assert master._next_tick() == BUSY_TICK  # not ready yet


def test_ready_is_announced_once_when_every_worker_serves(make_master, heard) -> None:
    master = make_master(workers=2)
    master._supervise(time.monotonic())
    first, second = sorted(master.workers.values(), key=lambda w: w.worker_id)
    report(master, State.READY, first)
    master._supervise(time.monotonic())
    assert heard.ready == 0 and first.phase is WorkerPhase.SERVING
    report(master, State.READY, second)
    master._supervise(time.monotonic())
    master._supervise(time.monotonic())
    assert heard.ready == 1 and master.ready_announced
    assert master._next_tick() == IDLE_TICK


def test_worker_ids_are_reused_only_once_free(make_master) -> None:
    master = make_master(workers=3)
    _, _, third = started(master)
    master.scale(2)
    master.scale(3)  # the third still drains: its successor takes id 4
    master._supervise(time.monotonic())
    assert sorted(w.worker_id for w in master.workers.values()) == [1, 2, 3, 4]
    exit_(master, third, 0)
    master.scale(4)
    master._supervise(time.monotonic())
    assert sorted(w.worker_id for w in master.workers.values()) == [1, 2, 3, 4]
    assert master.workers[fake(master).forked[-1]].worker_id == 3


# -- deaths, back-off, boot failures -------------------------------------------------------


def test_a_crash_is_replaced_at_once_after_a_long_life(make_master, board) -> None:
    master = make_master(workers=1)
    (worker,) = started(master)
    worker.started -= 60  # lived a minute
    exit_(master, worker, CRASHED)
    assert board.master().events[MasterCounter.RESTARTS_CRASHED] == 1
    master._supervise(time.monotonic())
    (successor,) = master.workers.values()
    assert successor.worker_id == 1 and successor.pid != worker.pid
    assert master.backoff == {}


def test_young_deaths_back_off_exponentially(make_master) -> None:
    master = make_master(workers=1)
    (worker,) = started(master)
    exit_(master, worker, CRASHED)  # died at once
    now = time.monotonic()
    master._supervise(now)
    assert master.workers == {}  # backing off: 0.1 s
    master._supervise(now + 0.2)
    (again,) = master.workers.values()
    exit_(master, again, CRASHED)
    assert master.backoff[1].failures == 2
    assert master.backoff[1].not_before - time.monotonic() == pytest.approx(0.2, abs=0.05)


def test_a_worker_that_cannot_boot_stops_echod(make_master) -> None:
    master = make_master(workers=2)
    first, second = started(master)
    exit_(master, first, BOOT_FATAL)
    assert master.exit_code == exitcodes.FAILURE
    assert master.phase is MasterPhase.STOPPING
    assert fake(master).sent(signal.SIGQUIT) == [second.pid]
    assert second.phase is WorkerPhase.QUITTING


# -- hung workers and deadlines ------------------------------------------------------------


def test_a_silent_worker_gets_sigabrt_then_sigkill(make_master, board) -> None:
    master = make_master(workers=1)
    (worker,) = started(master)
    now = time.monotonic() + 11  # past worker_timeout
    master._supervise(now)
    assert worker.phase is WorkerPhase.ABORTING
    assert fake(master).sent(signal.SIGABRT) == [worker.pid]
    master._supervise(now + ABORT_GRACE / 2)
    assert fake(master).sent(signal.SIGKILL) == []
    master._supervise(now + ABORT_GRACE)
    assert fake(master).sent(signal.SIGKILL) == [worker.pid]
    exit_(master, worker, signal.SIGKILL)
    assert board.master().events[MasterCounter.RESTARTS_TIMEOUT] == 1
    assert master.backoff == {}  # killed by us: no back-off, even if young


def test_a_draining_worker_that_overstays_is_killed_once_warned(make_master, caplog) -> None:
    master = make_master(workers=2)
    _, second = started(master)
    master.scale(1)
    assert second.phase is WorkerPhase.DRAINING
    deadline = second.deadline
    master._supervise(deadline)
    assert second.phase is WorkerPhase.KILLED
    master._supervise(deadline)
    assert fake(master).sent(signal.SIGKILL) == [second.pid]
    assert caplog.text.count("did not finish in time") == 1
    master._supervise(deadline + ABORT_GRACE)  # still there: SIGKILL again, no warning
    assert fake(master).sent(signal.SIGKILL) == [second.pid] * 2
    assert caplog.text.count("did not finish in time") == 1
    exit_(master, second, signal.SIGKILL)
    assert master.scoreboard.master().events[MasterCounter.RESTARTS_CRASHED] == 0


# -- scaling and recycling -------------------------------------------------------------------


def test_scaling_drains_the_highest_ids_and_is_capped(make_master) -> None:
    master = make_master(workers=3)
    workers = started(master)
    master.scale(1)
    assert [w.phase for w in workers] == [
        WorkerPhase.SERVING,
        WorkerPhase.DRAINING,
        WorkerPhase.DRAINING,
    ]
    assert fake(master).sent(signal.SIGTERM) == [workers[1].pid, workers[2].pid]
    master.scale(0)
    assert master.desired == 1
    master.scale(MAX_WORKERS + 10)
    assert master.desired == MAX_WORKERS


def test_a_worker_asking_for_replacement_serves_until_its_successor_does(
    make_master, board
) -> None:
    master = make_master(workers=1)
    (old,) = started(master)
    report(master, State.RETIRING, old)
    master._supervise(time.monotonic())
    assert old.phase is WorkerPhase.REPLACING
    (new,) = [w for w in master.workers.values() if w is not old]
    assert fake(master).sent(signal.SIGTERM) == []  # still serving: no successor yet
    report(master, State.READY, new)
    master._supervise(time.monotonic())
    assert old.phase is WorkerPhase.DRAINING
    assert fake(master).sent(signal.SIGTERM) == [old.pid]
    assert board.master().events[MasterCounter.RESTARTS_RECYCLED] == 1


# -- generation switches -------------------------------------------------------------------


@pytest.fixture
def no_rebinding(monkeypatch) -> None:
    """A reload keeps the (empty) listener set instead of binding anything."""
    monkeypatch.setattr(
        master_module,
        "reconcile",
        lambda current, addresses, backlog: ListenerChange(current, [], []),
    )


def test_hup_starts_a_generation_and_retires_the_old_once_it_serves(
    make_master, heard, board, no_rebinding
) -> None:
    master = make_master(workers=2)
    old = started(master)
    master._handle_signal(signal.SIGHUP)
    assert master.phase is MasterPhase.RELOADING and master.generation == 2
    master._supervise(time.monotonic())
    new = [w for w in master.workers.values() if w.generation == 2]
    assert len(new) == 2 and all(w.phase is WorkerPhase.SERVING for w in old)
    report(master, State.READY, *new)
    master._supervise(time.monotonic())
    assert master.phase is MasterPhase.RUNNING
    assert all(w.phase is WorkerPhase.DRAINING for w in old)
    assert board.master().events[MasterCounter.RELOADS_OK] == 1
    assert heard.reloading == 1 and heard.ready == 2


def test_a_new_generation_that_cannot_boot_is_abandoned(make_master, no_rebinding) -> None:
    master = make_master(workers=1)
    (old,) = started(master)
    master.reload()
    master._supervise(time.monotonic())
    (new,) = [w for w in master.workers.values() if w.generation == 2]
    exit_(master, new, BOOT_FATAL)
    assert master.generation == 1 and master.phase is MasterPhase.RUNNING
    assert old.phase is WorkerPhase.SERVING and master.exit_code == exitcodes.OK


def test_adopted_workers_retire_once_the_new_generation_serves(make_master, board) -> None:
    master = make_master(workers=1)
    handoff = Handoff(
        {},
        -1,
        -1,
        -1,
        generation=3,
        desired=1,
        workers=[AdoptedWorker(501, 1, 3), AdoptedWorker(502, 2, 2, True)],
    )
    for adopted in handoff.workers:  # their slots, as the previous image left them
        board.claim(
            adopted.worker_id - 1,
            pid=adopted.pid,
            generation=adopted.generation,
            worker_id=adopted.worker_id,
        )
    master.adopt(handoff)
    report(master, State.READY)
    assert master.phase is MasterPhase.ADOPTING and master.generation == 4
    assert master.workers[502].phase is WorkerPhase.DRAINING
    master._supervise(time.monotonic())
    (new,) = [w for w in master.workers.values() if w.generation == 4]
    assert new.worker_id == 3
    report(master, State.READY, new)
    master._supervise(time.monotonic())
    assert master.workers[501].phase is WorkerPhase.DRAINING
    assert master.phase is MasterPhase.RUNNING
    assert board.master().events[MasterCounter.UPGRADES_OK] == 1
    assert board.master().events[MasterCounter.RELOADS_OK] == 0  # an upgrade, not a reload


def test_adopted_workers_keep_their_age(make_master, board, caplog) -> None:
    # A mature worker that dies right after an upgrade is no young death: no back-off,
    # and the log says how long it really lived.
    master = make_master(workers=1)
    born = time.monotonic() - 100.0
    handoff = Handoff(
        {}, -1, -1, -1, generation=1, desired=1, workers=[AdoptedWorker(501, 1, 1, started=born)]
    )
    board.claim(0, pid=501, generation=1, worker_id=1)
    master.adopt(handoff)
    assert master.workers[501].started == born
    caplog.set_level(logging.ERROR, "echod.master")
    exit_(master, master.workers[501], CRASHED)
    assert "after 100." in caplog.text
    assert master.backoff == {}


def test_a_handoff_without_ages_counts_adopted_workers_from_now(make_master, board) -> None:
    master = make_master(workers=1)
    before = time.monotonic()
    master.adopt(
        Handoff({}, -1, -1, -1, generation=1, desired=1, workers=[AdoptedWorker(501, 1, 1)])
    )
    assert master.workers[501].started >= before


# -- stopping ----------------------------------------------------------------------------------


def test_a_fast_stop_overrides_a_graceful_one(make_master, heard) -> None:
    master = make_master(workers=2)
    workers = started(master)
    master._handle_signal(signal.SIGTERM)
    assert [w.phase for w in workers] == [WorkerPhase.DRAINING] * 2
    master._handle_signal(signal.SIGTERM)  # a second graceful stop changes nothing
    assert len(fake(master).sent(signal.SIGTERM)) == 2
    master._handle_signal(signal.SIGINT)
    assert [w.phase for w in workers] == [WorkerPhase.QUITTING] * 2
    assert heard.stopping == 1
    master._supervise(time.monotonic())
    assert len(master.workers) == 2  # nothing is spawned while stopping
    exit_(master, workers[0], 0)
    exit_(master, workers[1], CRASHED)  # expected: we asked it to go
    assert master.workers == {}
    assert master.scoreboard.master().events[MasterCounter.RESTARTS_CRASHED] == 0


def test_hup_ttin_and_usr2_are_ignored_while_stopping(make_master, heard) -> None:
    master = make_master(workers=1)
    started(master)
    master.stop(graceful=True)
    master._handle_signal(signal.SIGHUP)
    master._handle_signal(signal.SIGTTIN)
    master._handle_signal(signal.SIGUSR2)
    assert master.generation == 1 and master.desired == 1
    assert heard.reloading == 0 and not master.upgrade.in_progress


def test_term_with_a_shutdown_delay_serves_on_not_ready_then_stops(make_master, heard) -> None:
    master = make_master(workers=2, shutdown_delay=5.0)  # below worker_timeout
    workers = started(master)
    master._handle_signal(signal.SIGTERM)
    assert master.phase is MasterPhase.SHUTTING_DOWN
    assert master.scoreboard.master().status is MasterStatus.SHUTTING_DOWN
    assert heard.shutting_down == 1 and heard.stopping == 0
    assert [w.phase for w in workers] == [WorkerPhase.SERVING] * 2  # nobody told to go
    master._handle_signal(signal.SIGTERM)  # a second TERM does not cut the delay short
    master._handle_signal(signal.SIGHUP)  # nor does a reload start
    master._handle_signal(signal.SIGUSR2)  # nor an upgrade
    assert master.phase is MasterPhase.SHUTTING_DOWN and master.generation == 1
    assert not master.upgrade.in_progress and heard.reloading == 0
    master._supervise(master.shutdown_ends + 0.01)  # the delay is over
    assert master.phase is MasterPhase.STOPPING
    assert master.scoreboard.master().status is MasterStatus.STOPPING
    assert heard.stopping == 1
    assert all(w.phase is WorkerPhase.DRAINING for w in master.workers.values())


def test_int_during_the_shutdown_delay_stops_fast_at_once(make_master, heard) -> None:
    master = make_master(workers=2, shutdown_delay=30.0)
    workers = started(master)
    master._handle_signal(signal.SIGTERM)
    master._handle_signal(signal.SIGINT)
    assert master.phase is MasterPhase.STOPPING
    assert [w.phase for w in workers] == [WorkerPhase.QUITTING] * 2


def test_ttin_and_ttou_still_scale_during_the_shutdown_delay(make_master, heard) -> None:
    master = make_master(workers=2, shutdown_delay=30.0)
    started(master)
    master._handle_signal(signal.SIGTERM)
    master._handle_signal(signal.SIGTTIN)
    assert master.desired == 3
    master._handle_signal(signal.SIGTTOU)
    master._handle_signal(signal.SIGTTOU)
    assert master.desired == 1 and master.phase is MasterPhase.SHUTTING_DOWN


@pytest.mark.parametrize(
    ("shutdown_delay", "signum"),
    [(30.0, signal.SIGTERM), (0.0, signal.SIGTERM), (30.0, signal.SIGINT), (0.0, signal.SIGQUIT)],
)
def test_any_stop_kills_a_running_preflight_and_never_execs(
    make_master, monkeypatch, caplog, shutdown_delay: float, signum: signal.Signals
) -> None:
    def no_exec(*args: object) -> None:
        raise AssertionError("exec during a stop")

    monkeypatch.setattr(upgrade_module, "exec_new_image", no_exec)
    master = make_master(workers=1, shutdown_delay=shutdown_delay)
    started(master)
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    master.upgrade.preflight = Preflight(pid=4242, output_fd=read_fd, started=time.monotonic())
    with caplog.at_level(logging.WARNING, logger="echod.master"):
        master._handle_signal(signum)
    assert 4242 in fake(master).sent(signal.SIGKILL)
    assert "upgrade abandoned: echod is stopping" in caplog.text
    assert master.scoreboard.master().events[MasterCounter.UPGRADES_FAILED] == 1
    fake(master).exits.append((4242, 0))  # even a pre-flight that passed changes nothing
    master._reap()
    assert not master.upgrade.in_progress
    assert master.scoreboard.master().events[MasterCounter.UPGRADES_FAILED] == 1


def test_without_a_shutdown_delay_term_stops_at_once(make_master, heard) -> None:
    master = make_master(workers=1)
    started(master)
    master._handle_signal(signal.SIGTERM)
    assert master.phase is MasterPhase.STOPPING and heard.shutting_down == 0


# -- the phase tables ---------------------------------------------------------------------


def test_worker_moves_outside_the_table_raise() -> None:
    worker = WorkerProcess(1, 1, 1, 0.0)
    worker.move(WorkerPhase.SERVING)
    with pytest.raises(IllegalTransition):
        worker.move(WorkerPhase.BOOTING)
    worker.move(WorkerPhase.DRAINING, 5.0)
    assert worker.dismissed and worker.deadline == 5.0
    worker.move(WorkerPhase.KILLED)
    for phase in WorkerPhase:
        with pytest.raises(IllegalTransition):
            worker.move(phase)


def test_master_moves_outside_the_table_raise() -> None:
    assert check_master_move(MasterPhase.RUNNING, MasterPhase.RELOADING) is MasterPhase.RELOADING
    with pytest.raises(IllegalTransition):
        check_master_move(MasterPhase.STOPPING, MasterPhase.RUNNING)


# -- the shared pieces ----------------------------------------------------------------------


def test_restart_backoff_doubles_up_to_its_cap_and_resets_after_a_long_life() -> None:
    backoff = RestartBackoff()
    delays = [backoff.died(100.0, lived=1.0) for _ in range(9)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8] and delays[-1] == 10.0
    assert not backoff.may_start(105.0) and backoff.may_start(110.0)
    assert backoff.died(200.0, lived=60.0) == 0.0 and backoff.failures == 0
    assert backoff.died(200.0, lived=1.0, blameless=True) == 0.0


def test_exit_statuses_in_words() -> None:
    assert describe_exit(0) == "exited"
    assert describe_exit(3 << 8) == "exited with code 3"
    assert describe_exit(signal.SIGKILL) == "was killed by SIGKILL"


def test_a_handoff_from_the_previous_format_still_decodes() -> None:
    old = (
        '{"listener_fds": {"127.0.0.1:7007": 5}, "pidfile_fd": 6, "alive_read": 7, '
        '"alive_write": 8, "generation": 2, "desired": 1, "workers": [{"pid": 9, '
        '"worker_id": 1, "generation": 2, "retiring": true}], "activated": [], '
        '"metrics_bind": "127.0.0.1:9100", "metrics_fd": 10}'
    )
    handoff = Handoff.decode(old)
    assert handoff.helpers == {"metrics": {"127.0.0.1:9100": 10}}
    assert handoff.workers == [AdoptedWorker(9, 1, 2, dismissed=True)]
    assert Handoff.decode(handoff.encode()) == handoff
    assert sorted(handoff.fds()) == [5, 6, 7, 8, 10]


def test_after_fork_a_child_keeps_only_its_own_sockets() -> None:
    @dataclass
    class Queue:
        closed: bool = False

        def close(self) -> None:
            self.closed = True

    alive_read, alive_write = os.pipe()
    mine, other = socket.socketpair()
    keep = Listener(parse_address("127.0.0.1:0"), mine)
    drop = Listener(parse_address("127.0.0.1:0"), other)
    cleaned: list[str] = []
    queue = Queue()
    inherited = Inheritance(
        queue,
        alive_read,
        alive_write,
        1,  # type: ignore[arg-type]
        lambda: cleaned.append("pidfile"),
        lambda: [keep, drop],
    )
    try:
        after_fork_in_child(inherited, [keep])
        assert queue.closed and cleaned == ["pidfile"]
        assert other.fileno() == -1 and mine.fileno() != -1
        with pytest.raises(OSError):
            os.fstat(alive_write)
    finally:
        mine.close()
        os.close(alive_read)


def test_config_changes_reach_helpers_explicitly(make_master) -> None:
    seen: list[tuple[str, bool]] = []

    class Helper:
        name = "probe"

        def supervise(self, config: Config, stopping: bool, now: float) -> None:
            seen.append((config.metrics_bind, stopping))

    master = make_master(workers=1)
    master.helpers.append(Helper())  # type: ignore[arg-type]
    master.config = replace(master.config, metrics_bind="127.0.0.1:9")
    master._supervise(time.monotonic())
    master.stop(graceful=True)
    master._supervise(time.monotonic())
    assert seen == [("127.0.0.1:9", False), ("127.0.0.1:9", True)]


def test_a_handoff_from_a_newer_format_decodes_what_it_knows(caplog) -> None:
    newer = (
        '{"listener_fds": {"127.0.0.1:7007": 5}, "pidfile_fd": 6, "alive_read": 7, '
        '"alive_write": 8, "generation": 2, "desired": 1, "workers": [{"pid": 9, '
        '"worker_id": 1, "generation": 2, "affinity": [0]}], "activated": [], '
        '"helpers": {}, "proxy_fds": {}}'
    )
    handoff = Handoff.decode(newer)
    assert handoff.workers == [AdoptedWorker(9, 1, 2)]
    assert handoff.listener_fds == {"127.0.0.1:7007": 5}
    warnings = [r.getMessage() for r in caplog.records if "hand-off" in r.getMessage()]
    assert any("proxy_fds" in w for w in warnings) and any("affinity" in w for w in warnings)
