"""close_spread's schedule, the reload report and the drain flags: pure logic."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

import pytest
from support.master import fake_master, report, started

from echod import drainrequest
from echod.config import Config, load_config
from echod.errors import ConfigError
from echod.metrics import health
from echod.scoreboard import MasterFlag, MasterStatus, Scoreboard, State, WorkerSlot
from echod.server import master as master_module
from echod.server import reload_report
from echod.server.drain import MIN_STEP, NEVER, ClosePlan, CloseSpread, DrainSchedule
from echod.server.listeners import ListenerChange
from echod.server.master import Hooks
from echod.server.phases import WorkerPhase


def test_the_spread_window_ends_at_the_limit_and_is_clamped_to_it() -> None:
    plan = ClosePlan.starting(100.0, 10.0, 4.0)
    assert (plan.deadline, plan.spread_from) == (110.0, 106.0)
    clamped = ClosePlan.starting(100.0, 3.0, 4.0)
    assert (clamped.deadline, clamped.spread_from) == (103.0, 100.0)
    assert ClosePlan.starting(100.0, math.inf, 4.0) == ClosePlan(NEVER, 0.0)


def test_a_second_term_only_ever_brings_the_deadline_forward() -> None:
    reload = ClosePlan.starting(100.0, math.inf, 2.0)
    stop = ClosePlan.starting(105.0, 30.0, 2.0)
    assert reload.tightened(stop) is stop
    assert stop.tightened(ClosePlan.starting(106.0, 60.0, 2.0)) is stop


def test_closes_are_spread_evenly_and_all_done_by_the_end() -> None:
    spread = CloseSpread(0.0, 4.0, 200)
    now, ticks = 0.0, 0
    while now < 4.0 and ticks < 1000:  # one close per tick, each at its own time
        assert spread.due(now) == 1
        now, ticks = spread.next_at(now), ticks + 1
    assert spread.closed == 200 and spread.next_at(now) == math.inf
    per_second = CloseSpread(0.0, 4.0, 200)
    counts = [per_second.due(t + 0.999) for t in range(4)]
    assert counts == [50, 50, 50, 50]


def test_many_connections_wake_the_worker_at_most_every_min_step() -> None:
    spread = CloseSpread(0.0, 4.0, 100_000)
    now, ticks = 0.0, 0
    while spread.closed < 100_000 and ticks < 10_000:
        spread.due(now)
        now, ticks = spread.next_at(now), ticks + 1
    assert spread.closed == 100_000 and ticks <= 4.0 / MIN_STEP + 2


def test_a_late_tick_catches_up_and_the_end_closes_the_rest() -> None:
    spread = CloseSpread(0.0, 4.0, 10)
    assert spread.due(-1.0) == 0
    assert spread.due(0.0) == 1
    assert spread.due(2.0) == 5  # those due at 0.4, 0.8, 1.2, 1.6 and 2.0
    assert spread.due(9.0) == 4
    assert spread.due(10.0) == 0


def test_the_report_names_changes_redacts_secrets_and_keeps_start_only_keys(caplog) -> None:
    old = Config(idle_timeout=300.0, user="", umask=0o022)
    new = Config(idle_timeout=42.0, user="nobody", umask=0o077)
    assert reload_report.shown("auth_token", "hunter2") == "(redacted)"
    with caplog.at_level(logging.INFO, logger="echod.master"):
        effective = reload_report.report(old, new)
    assert "idle_timeout 300.0 -> 42.0" in caplog.text
    assert "umask 0o22 -> 0o77" in caplog.text
    assert "user, umask changed, but only a restart applies them" in caplog.text
    assert effective.idle_timeout == 42.0
    assert (effective.user, effective.umask) == ("", 0o022)


def test_reload_timeout_follows_graceful_timeout_unless_set() -> None:
    assert Config(graceful_timeout=7.0).reload_limit == 7.0
    assert Config(graceful_timeout=7.0, reload_timeout=20.0).reload_limit == 20.0
    assert Config(reload_timeout=0.0).reload_limit == math.inf
    with pytest.raises(ConfigError, match="reload_timeout"):
        load_config(None, {"reload_timeout": -2}, environ={})
    with pytest.raises(ConfigError, match="close_spread"):
        load_config(None, {"close_spread": -1}, environ={})


def test_scoreboard_flags_and_the_last_good_load(tmp_path: Path) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    try:
        view = board.master()
        assert not view.draining and view.last_reload_successful and view.last_config_load == 0
        board.set_master_flag(MasterFlag.DRAINING, True)
        board.config_loaded(True, 1234.5)
        board.config_loaded(False, 9999.0)
        view = board.master()
        assert view.draining and not view.last_reload_successful
        assert view.last_config_load == 1234.5
        board.set_master_flag(MasterFlag.DRAINING, False)
        assert not board.master().draining and not board.master().last_reload_successful
    finally:
        board.unlink()


def test_readyz_is_503_while_draining(tmp_path: Path) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    try:
        board.set_master_status(MasterStatus.SERVING)
        now = time.monotonic()
        board.master_heartbeat(now)
        board.claim(0, pid=1, generation=1, worker_id=1)
        WorkerSlot(board, 0).set_state(State.READY)
        assert health.readyz(board.snapshot(), os.getppid(), now)[0] == 200
        board.set_master_flag(MasterFlag.DRAINING, True)
        assert health.readyz(board.snapshot(), os.getppid(), now) == (
            503,
            "not ready: draining (echoctl undrain)\n",
        )
    finally:
        board.unlink()


def test_the_master_trusts_only_a_regular_file_of_its_own_user(tmp_path: Path) -> None:
    path = drainrequest.drain_request_path(str(tmp_path / "echod.pid"))
    assert path == str(tmp_path / "echod.drain")
    assert not drainrequest.requested(path, os.geteuid())
    os.symlink(tmp_path / "elsewhere", path)
    (tmp_path / "elsewhere").write_text("")
    assert not drainrequest.requested(path, os.geteuid())  # a symlink: never
    drainrequest.request(path)  # replaces the symlink itself
    assert drainrequest.requested(path, os.geteuid())
    assert not drainrequest.requested(path, os.geteuid() + 12345) or os.geteuid() == 0
    assert drainrequest.withdraw(path) and not drainrequest.withdraw(path)


def test_workers_retired_by_a_reload_get_reload_timeout_and_a_stop_shortens_it(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(
        master_module,
        "reconcile",
        lambda current, addresses, backlog: ListenerChange(current, [], []),
    )
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    try:
        config = Config(
            workers=1,
            runtime_dir=str(tmp_path),
            graceful_timeout=5.0,
            reload_timeout=0.0,
            worker_timeout=10.0,
        )
        master = fake_master(config, board, Hooks())
        (old,) = started(master)
        master._handle_signal(signal.SIGHUP)
        master._supervise(time.monotonic())
        report(master, State.READY, *[w for w in master.workers.values() if w.generation == 2])
        master._supervise(time.monotonic())
        assert old.phase is WorkerPhase.DRAINING and old.deadline == math.inf
        assert WorkerSlot(board, old.slot).drain_timeout() == math.inf
        master.stop(graceful=True)
        assert old.deadline < time.monotonic() + 7
        assert WorkerSlot(board, old.slot).drain_timeout() == 5.0
        assert master.children.sent(signal.SIGTERM).count(old.pid) == 2
    finally:
        board.unlink()


def test_a_scale_down_retires_for_reload_timeout_and_a_recycle_for_graceful_timeout(
    tmp_path: Path,
) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    try:
        config = Config(
            workers=2, runtime_dir=str(tmp_path), graceful_timeout=5.0, reload_timeout=12.0
        )
        master = fake_master(config, board, Hooks())
        first, second = started(master)
        master._handle_signal(signal.SIGTTOU)
        assert second.phase is WorkerPhase.DRAINING
        assert WorkerSlot(board, second.slot).drain_timeout() == 12.0
        WorkerSlot(board, first.slot).set_state(State.RETIRING)  # asks to be recycled
        master._supervise(time.monotonic())
        report(master, State.READY, *[w for w in master._current() if w is not first])
        master._supervise(time.monotonic())
        assert first.phase is WorkerPhase.DRAINING
        assert WorkerSlot(board, first.slot).drain_timeout() == 5.0
    finally:
        board.unlink()


def test_the_schedule_waits_for_the_window_then_spreads_and_a_stop_restarts_it() -> None:
    schedule = DrainSchedule(close_spread=4.0)
    assert schedule.begin(0.0, math.inf) == math.inf  # reload_timeout = 0: never forced
    assert schedule.due(100.0, 50) == (0, math.inf)
    assert schedule.begin(100.0, 10.0) == 110.0  # then a stop: graceful_timeout 10
    assert schedule.due(101.0, 50) == (0, 106.0)
    count, again = schedule.due(106.0, 40)
    assert count == 1 and again == pytest.approx(106.1)
    assert schedule.due(108.0, 39)[0] == 20  # those due at 106.1 ... 108.0
    assert schedule.begin(108.0, 30.0) == 110.0  # a later TERM changes nothing
    assert DrainSchedule(close_spread=0.0).due(5.0, 10) == (0, math.inf)
