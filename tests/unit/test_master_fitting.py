"""The master's side of fitting the machine, in-process with fake children: OOM
kills told apart from other SIGKILLs, and a reload that sizes the workers again."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from support.master import FakeChildren, fake_master, started

from echod.config import Config
from echod.scoreboard import MasterCounter, Scoreboard
from echod.server.master import Hooks, Master
from echod.system.cgroups import CgroupView
from echod.system.oom import OomWatch

KILLED = signal.SIGKILL  # a wait status: killed by signal 9


@pytest.fixture
def board(tmp_path: Path):
    scoreboard = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    yield scoreboard
    scoreboard.unlink()


@pytest.fixture
def events(tmp_path: Path) -> Path:
    """A fake cgroup v2 tree whose memory.events the test bumps like the kernel."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    (tmp_path / "proc/self/cgroup").write_text("0::/echod\n")
    cgroup = tmp_path / "sys/fs/cgroup/echod"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text(f"{64 << 20}\n")
    (cgroup / "memory.current").write_text(f"{40 << 20}\n")
    (cgroup / "memory.events").write_text("oom 0\noom_kill 0\n")
    return cgroup / "memory.events"


def master_with(tmp_path: Path, board: Scoreboard, workers: int = 1) -> Master:
    config = Config(workers=workers, runtime_dir=str(tmp_path), worker_timeout=10.0)
    master = fake_master(config, board, Hooks())
    master.oom = OomWatch(CgroupView.of_this_process(str(tmp_path)))
    return master


def reap(master: Master, pid: int, status: int) -> None:
    assert isinstance(master.children, FakeChildren)
    master.children.exits.append((pid, status))
    master._reap()


def test_an_oom_kill_is_logged_counted_and_replaced(
    tmp_path: Path, board: Scoreboard, events: Path, caplog: pytest.LogCaptureFixture
) -> None:
    master = master_with(tmp_path, board)
    (worker,) = started(master)
    events.write_text("oom 1\noom_kill 1\n")  # the kernel counts, then sends SIGKILL
    with caplog.at_level(logging.ERROR, logger="echod.master"):
        reap(master, worker.pid, KILLED)
    assert board.master().events[MasterCounter.RESTARTS_OOM] == 1
    assert board.master().events[MasterCounter.RESTARTS_CRASHED] == 0
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"worker 1 (pid {worker.pid}) was killed by the kernel's OOM killer" in line
    assert "limit 64.0 MiB, usage 40.0 MiB" in line and "replacing it" in line
    master._supervise(time.monotonic() + 1)  # past a young death's first back-off
    (successor,) = master.workers.values()
    assert successor.pid != worker.pid


def test_a_sigkill_the_kernel_did_not_count_is_a_crash(
    tmp_path: Path, board: Scoreboard, events: Path, caplog: pytest.LogCaptureFixture
) -> None:
    master = master_with(tmp_path, board, workers=2)
    first, second = started(master)
    events.write_text("oom 1\noom_kill 1\n")
    with caplog.at_level(logging.ERROR, logger="echod.master"):
        reap(master, first.pid, KILLED)  # the OOM killer's
        reap(master, second.pid, KILLED)  # someone's kill -9: the kill was claimed
    counted = board.master().events
    assert (counted[MasterCounter.RESTARTS_OOM], counted[MasterCounter.RESTARTS_CRASHED]) == (1, 1)
    assert "was killed by SIGKILL unexpectedly" in caplog.records[-1].getMessage()


def test_a_reload_sizes_the_workers_again(tmp_path: Path, board: Scoreboard) -> None:
    master = master_with(tmp_path, board, workers=1)
    started(master)
    master.load_config = lambda: replace(master.config, workers=3)
    master.reload()
    assert master.desired == 3
    assert master.sizing.why == "workers = 3 in the configuration"
