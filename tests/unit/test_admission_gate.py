"""The TCP admission gate, in process: allow/deny first, then the shared counts."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from echod.config import load_config
from echod.limits import conntrack
from echod.limits.admission import REJECTED, UNCOUNTED, AdmissionGate, address_policy
from echod.scoreboard import NUM_COUNTERS, Counter


class FullTable:
    """A connection table in which no new client finds a place."""

    def acquire(
        self, worker: int, key: bytes | None, per_client_limit: int, total_limit: int
    ) -> int:
        return conntrack.REJECT_TABLE_FULL


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("echod.admission")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_no_list_configured_means_no_policy_to_check() -> None:
    assert address_policy(load_config(cli_overrides={}, environ={})) is None


def test_denied_clients_are_counted_and_rejected() -> None:
    config = load_config(cli_overrides={"deny": ["127.0.0.2"]}, environ={})
    counters = [0] * NUM_COUNTERS
    gate = AdmissionGate(
        config,
        FullTable(),
        0,
        counters,  # type: ignore[arg-type]
        address_policy(config),
    )
    assert gate.admit("127.0.0.2") == REJECTED
    assert gate.admit("127.0.0.1") == UNCOUNTED  # no count limit: the table is not asked
    assert counters[Counter.REJECTED_DENIED] == 1


def test_a_full_table_is_logged_once_per_interval(warnings: list[str]) -> None:
    config = load_config(cli_overrides={"max_connections_per_ip": 1}, environ={})
    counters = [0] * NUM_COUNTERS
    gate = AdmissionGate(config, FullTable(), 0, counters, None)  # type: ignore[arg-type]
    for _ in range(5):
        assert gate.admit("127.0.0.1") == REJECTED
    assert counters[Counter.REJECTED_PER_IP] == 5
    assert len(warnings) == 1
    assert warnings[0].startswith("max_connections_per_ip: too many distinct clients")


def test_the_gate_names_the_counter_of_its_last_refusal() -> None:
    # a worker that refuses a connection after its PROXY header reports it under this
    config = load_config(
        cli_overrides={"deny": ["192.0.2.0/24"], "max_connections_per_ip": 1}, environ={}
    )
    counters = [0] * NUM_COUNTERS
    gate = AdmissionGate(
        config,
        FullTable(),
        0,
        counters,  # type: ignore[arg-type]
        address_policy(config),
    )
    assert gate.admit("192.0.2.7") == REJECTED
    assert gate.refused == Counter.REJECTED_DENIED
    assert gate.admit("198.51.100.1") == REJECTED  # the table is full
    assert gate.refused == Counter.REJECTED_PER_IP
    assert counters[Counter.REJECTED_DENIED] == counters[Counter.REJECTED_PER_IP] == 1
