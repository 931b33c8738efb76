"""/healthz and /readyz decisions from a scoreboard snapshot, and the README's metric
list agreeing with what the renderer emits."""

from __future__ import annotations

import os
import re
from pathlib import Path

from echod.metrics import health, render
from echod.scoreboard import (
    NUM_COUNTERS,
    MasterStatus,
    MasterView,
    Scoreboard,
    SlotView,
    Snapshot,
    State,
)

NOW = 1000.0
PARENT = os.getppid()  # health checks that the master is our parent


def _master(status: MasterStatus = MasterStatus.SERVING, heartbeat: int = 1000) -> MasterView:
    return MasterView(
        pid=PARENT,
        generation=1,
        code_started=0.0,
        master_started=0.0,
        version="t",
        retired=(0,) * NUM_COUNTERS,
        status=status,
        heartbeat=heartbeat,
    )


def _slot(state: State, heartbeat: float = NOW) -> SlotView:
    return SlotView(0, 1, 1, state, 1, 0.0, heartbeat, 0, (0,) * NUM_COUNTERS)


def test_healthz_needs_our_parent_and_a_recent_heartbeat() -> None:
    assert health.healthz(_master(), PARENT, NOW) == (200, "ok\n")
    assert health.healthz(_master(heartbeat=990), PARENT, NOW)[0] == 503
    assert health.healthz(_master(heartbeat=0), PARENT, NOW)[0] == 503
    assert health.healthz(_master(), PARENT + 1, NOW)[0] == 503


def test_readyz_reasons() -> None:
    def ready(master: MasterView, *slots: SlotView) -> tuple[int, str]:
        return health.readyz(Snapshot(master, list(slots)), PARENT, NOW)

    assert ready(_master(), _slot(State.READY)) == (200, "ready\n")
    assert ready(_master(), _slot(State.RETIRING)) == (200, "ready\n")
    assert ready(_master(), _slot(State.BOOTING)) == (503, "not ready: no worker serving\n")
    assert ready(_master(), _slot(State.READY, NOW - 60))[0] == 503
    assert ready(_master(MasterStatus.STARTING), _slot(State.READY))[1] == "not ready: starting\n"
    for status in (MasterStatus.SHUTTING_DOWN, MasterStatus.STOPPING):
        assert ready(_master(status), _slot(State.READY)) == (503, "not ready: shutting down\n")


def test_the_readme_lists_every_metric_family(tmp_path) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    try:
        board.set_master(pid=os.getpid(), generation=1, code_started=0.0, version="t")
        names = {family.name for family in render.collect(board, render.ProcessSampler(), 1024)}
    finally:
        board.close()
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Metrics (Prometheus)", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"`((?:echod|process)_[a-z_]+)", section))
    assert names - listed == set(), f"missing from the README: {sorted(names - listed)}"
    assert listed - names == set(), f"in the README but not emitted: {sorted(listed - names)}"
