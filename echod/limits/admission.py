"""Abuse resistance shared by every worker: what the master creates before it forks
(:class:`SharedLimits`) and the per-worker TCP admission check run at accept.

A worker builds an :class:`AdmissionGate` only when some TCP limit is configured;
otherwise its accept path has nothing to call.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from echod import logs
from echod.cidr import AddressPolicy
from echod.config import Config
from echod.limits import conntrack
from echod.limits.conntrack import ConnectionTable, client_key
from echod.limits.ratelimit import SharedBuckets
from echod.scoreboard import Counter

log = logging.getLogger("echod.admission")

# AdmissionGate.admit() results besides a conntrack place (>= 0) or conntrack.COUNTED
REJECTED = -100
UNCOUNTED = -101  # admitted; nothing to release at close
_LINGER_RESET = struct.pack("ii", 1, 0)
TABLE_FULL_LOG_INTERVAL = 10.0


@dataclass
class SharedLimits:
    """Shared memory for the limits enforced across workers (see conntrack, ratelimit)."""

    connections: ConnectionTable = field(default_factory=ConnectionTable.create)
    udp_buckets: SharedBuckets = field(default_factory=SharedBuckets.create)

    def forget_worker(self, slot: int, alive_slots: Iterable[int]) -> None:
        """Called by the master when it reaps a worker, whatever killed it."""
        self.connections.forget_worker(slot, alive_slots)


def address_policy(config: Config) -> AddressPolicy | None:
    """``allow`` / ``deny`` as one policy, or None when neither is set. Built once
    per worker and shared by the TCP gate and the UDP checks."""
    policy = AddressPolicy(config.allow, config.deny)
    return policy if policy else None


def tcp_limits_configured(config: Config) -> bool:
    return bool(
        config.allow or config.deny or config.max_connections_per_ip or config.max_connections_total
    )


class AdmissionGate:
    """Decides at accept whether a TCP client may stay; counts what it refuses."""

    def __init__(
        self,
        config: Config,
        table: ConnectionTable,
        worker_slot: int,
        counters: list[int],
        policy: AddressPolicy | None,
    ) -> None:
        self.policy = policy
        self.table = table
        self.worker_slot = worker_slot
        self.per_ip_limit = config.max_connections_per_ip
        self.total_limit = config.max_connections_total
        self.counting = bool(self.per_ip_limit or self.total_limit)
        self.counters = counters
        # the counter of the last refusal: a worker that closes a connection it had
        # already taken in (after a PROXY header) reports it under that reason
        self.refused = Counter.REJECTED_DENIED
        self.table_full_log = logs.RateLimitedLog(log, TABLE_FULL_LOG_INTERVAL)

    def admit(self, host: str) -> int:
        """REJECTED, UNCOUNTED, or a ticket (>= conntrack.COUNTED) for release()."""
        if self.policy is not None and not self.policy.permits(host):
            return self._refuse(Counter.REJECTED_DENIED)
        if not self.counting:
            return UNCOUNTED
        key = client_key(host) if self.per_ip_limit else None
        ticket = self.table.acquire(self.worker_slot, key, self.per_ip_limit, self.total_limit)
        if ticket >= conntrack.COUNTED:
            return ticket
        if ticket == conntrack.REJECT_TOTAL:
            return self._refuse(Counter.REJECTED_TOTAL)
        if ticket == conntrack.REJECT_TABLE_FULL:
            self.table_full_log.log(
                logging.WARNING,
                "max_connections_per_ip: too many distinct clients "
                "connected at once (table of %d); refusing new clients until some leave",
                conntrack.ENTRIES,
            )
        return self._refuse(Counter.REJECTED_PER_IP)

    def _refuse(self, reason: Counter) -> int:
        self.counters[reason] += 1
        self.refused = reason
        return REJECTED

    def release(self, ticket: int) -> None:
        self.table.release(self.worker_slot, ticket)


def reject(client: socket.socket) -> None:
    """Close at once with an RST: no TIME_WAIT left on our side, nothing read."""
    reset_on_close(client)
    client.close()


def reset_on_close(client: socket.socket) -> None:
    """Make the socket's close an RST (SO_LINGER 0), as a refusal at accept is."""
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
