"""echoctl status --watch: rates from two scoreboard samples (pure functions)."""

from __future__ import annotations

import pytest

from echod.ctl.rates import Sample, WorkerSample, rates, sample, totals
from echod.scoreboard import NUM_COUNTERS, Counter, MasterView, SlotView, Snapshot, State


def worker(wid: int, pid: int, accepted: int, bytes_in: int = 0, active: int = 0) -> WorkerSample:
    return WorkerSample(wid, pid, "ready", active, accepted, bytes_in, bytes_in)


def test_rates_are_deltas_over_the_interval_with_shares() -> None:
    before = Sample(10.0, (worker(1, 100, 10, 1000), worker(2, 200, 20, 0)))
    after = Sample(12.0, (worker(1, 100, 16, 3000, active=2), worker(2, 200, 22, 0)))
    one, two = rates(before, after)
    assert one.connections_per_s == pytest.approx(3.0)
    assert one.bytes_in_per_s == pytest.approx(1000.0)
    assert one.bytes_out_per_s == pytest.approx(1000.0)
    assert two.connections_per_s == pytest.approx(1.0)
    assert one.share == pytest.approx(0.75) and two.share == pytest.approx(0.25)
    assert one.connections == 2 and one.accepted == 16
    assert totals([one, two])["connections_per_s"] == pytest.approx(4.0)


def test_first_sample_has_no_rates() -> None:
    rows = rates(None, Sample(1.0, (worker(1, 100, 5),)))
    assert rows[0].connections_per_s is None and rows[0].share is None
    assert totals(rows)["connections_per_s"] is None


def test_new_or_respawned_worker_has_no_rates_but_others_do() -> None:
    before = Sample(0.0, (worker(1, 100, 10), worker(2, 200, 10)))
    # worker 1 was respawned (new pid, counters from zero); worker 3 is new
    after = Sample(1.0, (worker(1, 101, 1), worker(2, 200, 14), worker(3, 300, 2)))
    one, two, three = rates(before, after)
    assert one.connections_per_s is None and one.share is None
    assert three.connections_per_s is None
    assert two.connections_per_s == pytest.approx(4.0) and two.share == pytest.approx(1.0)


def test_pid_reused_by_another_worker_id_has_no_rates() -> None:
    before = Sample(0.0, (worker(1, 100, 10),))
    after = Sample(1.0, (worker(2, 100, 12),))
    assert rates(before, after)[0].connections_per_s is None


def test_counter_going_backwards_is_unknown_not_negative() -> None:
    before = Sample(0.0, (worker(1, 100, 10, bytes_in=500),))
    after = Sample(1.0, (worker(1, 100, 12, bytes_in=100),))
    row = rates(before, after)[0]
    assert row.connections_per_s == pytest.approx(2.0)
    assert row.bytes_in_per_s is None


@pytest.mark.parametrize("elapsed", [0.0, -1.0])
def test_zero_or_negative_interval_gives_no_rates(elapsed: float) -> None:
    before = Sample(5.0, (worker(1, 100, 10),))
    after = Sample(5.0 + elapsed, (worker(1, 100, 12),))
    row = rates(before, after)[0]
    assert row.connections_per_s is None and row.bytes_in_per_s is None and row.share is None


def test_no_connections_in_the_interval_means_no_share() -> None:
    before = Sample(0.0, (worker(1, 100, 10),))
    row = rates(before, Sample(1.0, (worker(1, 100, 10),)))[0]
    assert row.connections_per_s == 0.0 and row.share is None


def test_sample_skips_free_slots_and_orders_by_worker() -> None:
    counters = [0] * NUM_COUNTERS
    counters[Counter.ACCEPTED], counters[Counter.BYTES_IN] = 7, 70

    def slot(index: int, wid: int, state: State) -> SlotView:
        return SlotView(index, 1000 + index, 1, state, wid, 0.0, 0.0, 1, tuple(counters))

    master = MasterView(1, 1, 0.0, 0.0, "x", ())
    snap = Snapshot(
        master, [slot(0, 2, State.READY), slot(1, 0, State.FREE), slot(2, 1, State.DRAINING)]
    )
    taken = sample(snap, 3.0)
    assert taken.taken == 3.0
    assert [(w.worker, w.state, w.accepted, w.bytes_in) for w in taken.workers] == [
        (1, "draining", 7, 70),
        (2, "ready", 7, 70),
    ]
