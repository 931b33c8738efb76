"""``/healthz`` and ``/readyz``: what the scoreboard header and slots say of the master.

healthz: the master is alive and looping. It is the metrics process's parent
(we die with it, so a different parent means it is gone) and its heartbeat,
written on every pass of its loop (at least once a second when idle), is
recent. STALE_AFTER is 5 s: a few idle ticks of 1 s plus room for a busy
2-core machine, short enough for a Kubernetes liveness probe to notice a hung
(or SIGSTOPped) master within one probe period.

readyz: the master serves (status SERVING), is not draining (``echoctl drain``)
and at least one worker slot is
READY or RETIRING (still serving) with a fresh heartbeat.
"""

from __future__ import annotations

import os
import time

from echod.scoreboard import MasterStatus, MasterView, Snapshot, State

STALE_AFTER = 5  # seconds without a master heartbeat before /healthz says 503
WORKER_STALE_AFTER = 5.0  # seconds without a worker heartbeat before it does not count
SERVING_STATES = (State.READY, State.RETIRING)
NOT_READY = {
    MasterStatus.STARTING: "not ready: starting",
    MasterStatus.SHUTTING_DOWN: "not ready: shutting down",
    MasterStatus.STOPPING: "not ready: shutting down",
}


def healthz(master: MasterView, master_pid: int, now: float | None = None) -> tuple[int, str]:
    """(HTTP status, body line) for GET /healthz."""
    if os.getppid() != master_pid:
        return 503, "unhealthy: master gone\n"
    now_s = int(time.monotonic() if now is None else now)
    if master.heartbeat == 0 or now_s - master.heartbeat > STALE_AFTER:
        return 503, "unhealthy: master heartbeat stale\n"
    return 200, "ok\n"


def readyz(snapshot: Snapshot, master_pid: int, now: float | None = None) -> tuple[int, str]:
    """(HTTP status, body line) for GET /readyz."""
    now = time.monotonic() if now is None else now
    status, _ = healthz(snapshot.master, master_pid, now)
    if status != 200:
        return 503, "not ready: master not healthy\n"
    if snapshot.master.status is not MasterStatus.SERVING:
        return 503, NOT_READY.get(snapshot.master.status, "not ready: starting") + "\n"
    if snapshot.master.draining:
        return 503, "not ready: draining (echoctl undrain)\n"
    if not any(
        slot.state in SERVING_STATES and now - slot.heartbeat <= WORKER_STALE_AFTER
        for slot in snapshot.slots
    ):
        return 503, "not ready: no worker serving\n"
    return 200, "ready\n"
