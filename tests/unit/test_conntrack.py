"""The cross-worker connection table behind max_connections_per_ip / _total."""

from __future__ import annotations

import os

import pytest

from echod.limits import conntrack
from echod.limits.conntrack import ConnectionTable, client_key

A = client_key("127.0.0.1")
B = client_key("127.0.0.2")
PROBE = 9  # a worker slot no test uses: counts are read through it, then given back


def count_from(table: ConnectionTable, key: bytes) -> int:
    """A client's count as max_connections_per_ip sees it: a limit admits it only
    above that count, so the smallest limit that admits it is the count plus one."""
    for limit in range(1, 1000):
        place = table.acquire(PROBE, key, limit, 0)
        if place >= 0:
            table.release(PROBE, place)
            return limit - 1
    raise AssertionError("no limit admits this client")


def count_all(table: ConnectionTable) -> int:
    """Every open connection as max_connections_total sees it (the same way)."""
    for limit in range(1, 1000):
        if table.acquire(PROBE, None, 0, limit) == conntrack.COUNTED:
            table.release(PROBE, conntrack.COUNTED)
            return limit - 1
    raise AssertionError("no limit admits a connection")


@pytest.fixture(scope="module")
def shared() -> ConnectionTable:
    return ConnectionTable.create()


@pytest.fixture
def table(shared: ConnectionTable) -> ConnectionTable:
    for worker in (*range(4), PROBE):
        shared.forget_worker(worker, [])
    return shared


def test_per_client_limit_across_workers(table: ConnectionTable) -> None:
    tickets = [table.acquire(worker, A, 3, 0) for worker in (0, 1, 2)]
    assert all(ticket >= 0 for ticket in tickets)
    assert table.acquire(1, A, 3, 0) == conntrack.REJECT_PER_IP
    assert table.acquire(1, B, 3, 0) >= 0  # another client has its own count
    assert count_from(table, A) == 3
    table.release(0, tickets[0])
    assert count_from(table, A) == 2
    assert table.acquire(2, A, 3, 0) >= 0
    assert count_all(table) == 4


def test_total_limit(table: ConnectionTable) -> None:
    assert table.acquire(0, None, 0, 2) == conntrack.COUNTED
    assert table.acquire(1, None, 0, 2) == conntrack.COUNTED
    assert table.acquire(2, None, 0, 2) == conntrack.REJECT_TOTAL
    table.release(1, conntrack.COUNTED)
    assert table.acquire(2, A, 5, 2) >= 0


def test_a_dead_workers_connections_stop_counting(table: ConnectionTable) -> None:
    for worker in (0, 1, 1, 2):
        assert table.acquire(worker, A, 10, 0) >= 0
    table.forget_worker(1, alive=[0, 2])
    assert count_from(table, A) == 2
    assert count_all(table) == 2
    table.forget_worker(0, alive=[2])
    assert count_from(table, A) == 1


def test_forget_rebuilds_sums_from_the_rows_of_live_workers(table: ConnectionTable) -> None:
    """A worker killed half-way through an update leaves the sums off; the master's
    rebuild makes them exact again."""
    assert table.acquire(0, A, 10, 0) >= 0
    assert table.acquire(3, A, 10, 0) >= 0
    table._client_totals[table._find_or_claim(A)] += 7  # a torn update
    table._grand_total[0] += 7
    table.forget_worker(3, alive=[0])
    assert count_from(table, A) == 1
    assert count_all(table) == 1


def test_places_are_reused_once_a_client_leaves(table: ConnectionTable) -> None:
    # far more distinct clients over time than places in a probe window
    for index in range(4 * conntrack.PROBES):
        key = client_key(f"127.1.{index // 256}.{index % 256}")
        place = table.acquire(0, key, 1, 0)
        assert place >= 0
        table.release(0, place)
    assert count_all(table) == 0


def test_a_full_neighbourhood_refuses_rather_than_admits_unchecked(table: ConnectionTable) -> None:
    mask = conntrack.ENTRIES - 1
    same_home: list[bytes] = []
    number = 0
    while len(same_home) <= conntrack.PROBES:  # PROBES + 1 clients with one home place
        key = number.to_bytes(16, "big")
        if hash(key) & mask == 5:
            same_home.append(key)
        number += 1
    for key in same_home[:-1]:
        assert table.acquire(0, key, 1, 0) >= 0
    assert table.acquire(0, same_home[-1], 1, 0) == conntrack.REJECT_TABLE_FULL
    table.forget_worker(0, [])
    assert table.acquire(0, same_home[-1], 1, 0) >= 0


def test_forked_workers_never_exceed_the_limit(table: ConnectionTable) -> None:
    limit = 25
    children = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:
            won = sum(table.acquire(worker, A, limit, 0) >= 0 for _ in range(200))
            os._exit(won)
        children.append(pid)
    wins = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert sum(wins) == limit
    assert count_from(table, A) == limit
