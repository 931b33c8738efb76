"""What sits around the master: the metrics supervisor's decisions and the systemd hooks."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.master import FakeChildren, fake_master, started

from echod import drainrequest
from echod.config import Config
from echod.scoreboard import Scoreboard
from echod.server.children import Inheritance
from echod.server.metrics_child import MetricsService
from echod.server.startup import SystemdHooks
from echod.system.systemd import Notifier


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Scoreboard]:
    scoreboard = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    yield scoreboard
    scoreboard.unlink()


METRICS = "127.0.0.1:0"


@pytest.fixture
def children() -> FakeChildren:
    return FakeChildren(inherited=Inheritance(None, -1, -1, 1, lambda: None, list))  # type: ignore[arg-type]


@pytest.fixture
def service(board: Scoreboard, children: FakeChildren) -> Iterator[MetricsService]:
    metrics = MetricsService.open(METRICS)
    metrics.attach(children, board)
    yield metrics
    if metrics.listener is not None:
        metrics.listener.close()


def test_the_metrics_process_runs_only_for_metrics_bind(
    board: Scoreboard, children: FakeChildren
) -> None:
    unbound = MetricsService()
    unbound.attach(children, board)
    # max_worker_memory is the workers' own business: it starts no process here
    unbound.supervise(Config(max_worker_memory=1 << 20), stopping=False, now=0.0)
    assert unbound.pid == 0 and children.forked == []


def test_a_new_metrics_bind_restarts_the_process_without_back_off(
    service: MetricsService, children: FakeChildren
) -> None:
    service.supervise(Config(metrics_bind=METRICS), stopping=False, now=0.0)
    first = service.pid
    moved = Config(metrics_bind="unix:" + service.scoreboard.path + ".metrics")  # type: ignore[union-attr]
    service.supervise(moved, stopping=False, now=0.1)
    assert children.sent(signal.SIGTERM) == [first]
    assert service.child_exited(first, signal.SIGTERM)
    service.supervise(moved, stopping=False, now=0.2)
    assert service.pid not in (0, first) and service.backoff.failures == 0


def test_a_metrics_process_dying_young_is_restarted_later(service: MetricsService) -> None:
    config = Config(metrics_bind=METRICS)
    service.supervise(config, stopping=False, now=0.0)
    assert service.pid
    assert service.child_exited(service.pid, 1 << 8)  # at once: young
    assert not service.child_exited(4242, 0)  # not ours
    now = time.monotonic()
    service.supervise(config, stopping=False, now=now)
    assert service.pid == 0 and service.backoff.failures == 1
    service.supervise(config, stopping=False, now=now + 1)
    assert service.pid
    service.child_exited(service.pid, 0)
    service.supervise(config, stopping=True, now=now + 60)
    assert service.pid == 0  # never started while the master stops


SENT: list[dict[str, Any]] = []


class RecordingNotifier(Notifier):
    """sd_notify messages, recorded instead of sent (Notifier is frozen: a module list)."""

    def notify(self, **fields: Any) -> bool:
        SENT.append(fields)
        return True


def test_systemd_hears_the_watchdog_only_while_workers_serve(
    tmp_path: Path, board: Scoreboard
) -> None:
    notifier = RecordingNotifier(address="@echod-test", watchdog_usec=60_000_000)
    SENT.clear()
    systemd = SystemdHooks(notifier, reporter=None)
    config = Config(workers=1, runtime_dir=str(tmp_path))
    master = fake_master(config, board, systemd.hooks())
    master._supervise(0.0)  # booting: a first STATUS, no watchdog
    assert SENT == [{"STATUS": "0 worker(s) serving, 0 connection(s), generation 1"}]
    started(master)
    kinds = [key for message in SENT for key in message]
    assert kinds.count("READY") == 1 and kinds.count("WATCHDOG") == 1
    SENT.clear()
    master._supervise(0.0)  # within the interval, and the status line unchanged: quiet
    assert SENT == []


def test_term_sends_stopping_at_once_and_never_ready_after_it(
    tmp_path: Path, board: Scoreboard
) -> None:
    notifier = RecordingNotifier(address="@echod-test")
    SENT.clear()
    systemd = SystemdHooks(notifier, reporter=None)
    config = Config(workers=1, runtime_dir=str(tmp_path), shutdown_delay=30)
    master = fake_master(config, board, systemd.hooks())
    now = time.monotonic()
    master._supervise(now)  # still booting when TERM arrives
    SENT.clear()
    master.stop(graceful=True)
    # STOPPING=1 arms TimeoutStopSec: at TERM, with the reason in the same message
    assert len(SENT) == 1 and SENT[0]["STOPPING"] == 1
    assert SENT[0]["STATUS"].startswith("shutting down: not ready, still serving for 30 s")
    started(master, now)  # the worker becomes ready during the delay
    master._supervise(now + 31)  # the delay ends: the graceful stop begins
    kinds = [key for message in SENT for key in message]
    assert "READY" not in kinds
    assert kinds.count("STOPPING") == 1


def test_term_without_a_delay_sends_stopping_once(tmp_path: Path, board: Scoreboard) -> None:
    notifier = RecordingNotifier(address="@echod-test")
    SENT.clear()
    systemd = SystemdHooks(notifier, reporter=None)
    master = fake_master(Config(workers=1, runtime_dir=str(tmp_path)), board, systemd.hooks())
    started(master)
    SENT.clear()
    master.stop(graceful=True)
    master.stop(graceful=False)  # INT after TERM
    assert [key for message in SENT for key in message] == ["STOPPING"]


def test_a_drain_request_changes_the_status_line_at_once(tmp_path: Path, board: Scoreboard) -> None:
    notifier = RecordingNotifier(address="@echod-test")
    systemd = SystemdHooks(notifier, reporter=None)
    master = fake_master(Config(workers=1, runtime_dir=str(tmp_path)), board, systemd.hooks())
    now = time.monotonic()
    started(master, now)
    SENT.clear()
    drainrequest.request(drainrequest.drain_request_path(str(tmp_path / "echod.pid")))
    master._supervise(now)  # within the status interval: sent anyway
    assert SENT == [
        {
            "STATUS": "draining: not ready, still serving (echoctl undrain); 1 worker(s) serving,"
            " 0 connection(s), generation 1"
        }
    ]
    assert board.master().draining
    drainrequest.withdraw(drainrequest.drain_request_path(str(tmp_path / "echod.pid")))
    master._supervise(now)
    assert SENT[-1]["STATUS"].startswith("1 worker(s) serving") and not board.master().draining
