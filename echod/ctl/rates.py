"""Per-worker rates from two scoreboard samples (pure: no I/O, no clock).

``echoctl status --watch`` samples the scoreboard once a frame and shows what
changed since the previous sample. A rate is ``None`` (shown as ``-``) when it
cannot be honest: a worker new since the last sample or whose pid changed (a
respawn reuses the worker id), a counter that went backwards, or no time
elapsed between the two samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from echod.scoreboard import Counter, SlotView, Snapshot, State


@dataclass(frozen=True)
class WorkerSample:
    worker: int
    pid: int
    state: str
    connections: int  # open now
    accepted: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class Sample:
    taken: float  # time.monotonic() when read
    workers: tuple[WorkerSample, ...]


@dataclass(frozen=True)
class WorkerRate:
    worker: int
    pid: int
    state: str
    connections: int
    accepted: int
    connections_per_s: float | None
    bytes_in_per_s: float | None
    bytes_out_per_s: float | None
    share: float | None  # of the connections all workers accepted in the interval (0..1)


def sample(snapshot: Snapshot, taken: float) -> Sample:
    slots = sorted(
        (slot for slot in snapshot.slots if slot.state != State.FREE),
        key=lambda s: (s.worker_id, s.pid),
    )
    return Sample(taken, tuple(_worker_sample(slot) for slot in slots))


def _worker_sample(slot: SlotView) -> WorkerSample:
    return WorkerSample(
        worker=slot.worker_id,
        pid=slot.pid,
        state=slot.state.name.lower(),
        connections=slot.active,
        accepted=slot.counter(Counter.ACCEPTED),
        bytes_in=slot.counter(Counter.BYTES_IN),
        bytes_out=slot.counter(Counter.BYTES_OUT),
    )


def rates(previous: Sample | None, current: Sample) -> list[WorkerRate]:
    """One row per worker in ``current``; rates against ``previous`` where honest."""
    interval = current.taken - previous.taken if previous is not None else 0.0
    # Keyed by pid: a respawned worker keeps its worker id but is a new process
    # whose counters start again from zero.
    before = {w.pid: w for w in previous.workers} if previous is not None else {}
    rows = []
    for worker in current.workers:
        old = before.get(worker.pid)
        if old is None or old.worker != worker.worker:
            old = None
        rows.append(
            WorkerRate(
                worker=worker.worker,
                pid=worker.pid,
                state=worker.state,
                connections=worker.connections,
                accepted=worker.accepted,
                connections_per_s=_rate(
                    None if old is None else old.accepted, worker.accepted, interval
                ),
                bytes_in_per_s=_rate(
                    None if old is None else old.bytes_in, worker.bytes_in, interval
                ),
                bytes_out_per_s=_rate(
                    None if old is None else old.bytes_out, worker.bytes_out, interval
                ),
                share=None,
            )
        )
    return _with_shares(rows)


def _rate(before: int | None, after: int, interval: float) -> float | None:
    if before is None or after < before or interval <= 0:
        return None
    return (after - before) / interval


def _with_shares(rows: list[WorkerRate]) -> list[WorkerRate]:
    """Each worker's part of the connections accepted in the interval. A worker
    without a rate (new, respawned) gets none; the others share what is known."""
    known = [r.connections_per_s for r in rows if r.connections_per_s is not None]
    total = sum(known)
    if total <= 0:
        return rows
    return [
        r if r.connections_per_s is None else replace(r, share=r.connections_per_s / total)
        for r in rows
    ]


def totals(rows: list[WorkerRate]) -> dict[str, float | None]:
    """Sums over the workers whose rates are known (None when none is)."""

    def total(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    return {
        "connections": sum(r.connections for r in rows),
        "connections_per_s": total([r.connections_per_s for r in rows]),
        "bytes_in_per_s": total([r.bytes_in_per_s for r in rows]),
        "bytes_out_per_s": total([r.bytes_out_per_s for r in rows]),
    }
