"""``proxy_protocol_from``: connections from those sources begin in the
awaiting-header state; no byte is echoed and no admission rule applied until
their PROXY header is complete (parsing: echod.server.proxy).

A mixin of the worker chosen once at start (``start_worker``): without the list
the plain worker runs, and neither its accept path nor its echo path look for
it. Here an untrusted connection costs one set lookup at accept; once its header
is done, a proxied connection's echo path is the plain one.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from echod.cidr import NetworkSet
from echod.config import Config
from echod.limits.admission import REJECTED, AdmissionGate, reset_on_close
from echod.logs import RateLimitedLog
from echod.scoreboard import Counter
from echod.server.accepting import AF_UNIX, Opener
from echod.server.access import format_peer
from echod.server.connection import NOTHING_PENDING, Connection, recv_into, send
from echod.server.proxy import Done, Malformed, ProxyHeaderParser
from echod.server.timeouts import TimeoutWheel

# What an awaiting connection's ``pending`` holds until its PROXY header is complete:
# truthy, so the inlined hot path hands its events to _on_backlogged (which the
# proxy-aware worker intercepts), and immutable, so nothing can append to it.
AWAITING_HEADER = b"PROXY header"


class ProxiedConnection(Connection):
    """A connection from a ``proxy_protocol_from`` source, header not read yet."""

    __slots__ = ("header",)

    def __init__(self, sock: socket.socket, fd: int, peer: object, now: float) -> None:
        super().__init__(sock, fd, peer, now)
        self.pending = AWAITING_HEADER  # type: ignore[assignment]  # see AWAITING_HEADER
        self.header = ProxyHeaderParser()

    @property
    def bytes_out(self) -> int:
        return 0 if self.pending is AWAITING_HEADER else super().bytes_out


class ProxyHeaders:
    """The PROXY header side of a worker (a mixin placed before the worker class:
    it extends ``_opener``, ``_on_backlogged`` and ``_housekeeping``)."""

    config: Config
    connections: dict[int, Connection]
    admission: AdmissionGate | None
    counters: list[int]
    buffer: bytearray
    view: memoryview
    bytes_in: int
    bytes_out: int
    idle_timeout: float
    idle_wheel: TimeoutWheel[Connection] | None
    next_housekeeping: float
    error_log: RateLimitedLog
    _close: Callable[[Connection, Counter], None]
    _keep_unsent: Callable[[Connection, memoryview], None]

    def _init_proxy_headers(self) -> None:
        self.trusted = NetworkSet(self.config.proxy_protocol_from)
        self.header_timeout = self.config.proxy_header_timeout
        self.header_wheel: TimeoutWheel[Connection] = TimeoutWheel.for_timeout(self.header_timeout)

    def _opener(self, family: int) -> Opener:
        plain: Opener = super()._opener(family)  # type: ignore[misc]
        if family == AF_UNIX:  # no PROXY header on unix sockets: nobody to trust there
            return plain
        trusted = self.trusted

        def open_maybe_proxied(
            client: socket.socket, fd: int, peer: object, now: float
        ) -> Connection | None:
            if peer[0] not in trusted:  # type: ignore[index]  # an IP (host, port)
                return plain(client, fd, peer, now)
            # admission waits for the header: the balancer's address is not the client
            client.setblocking(False)
            conn = ProxiedConnection(client, fd, peer, now)
            self.header_wheel.add(conn.fd, conn, now + self.header_timeout)
            self.next_housekeeping = min(self.next_housekeeping, now + self.header_timeout)
            return conn

        return open_maybe_proxied

    def _on_backlogged(self, conn: Connection, mask: int, now: float) -> None:
        if conn.pending is AWAITING_HEADER:
            self._read_header(conn, now)  # type: ignore[arg-type]  # only ProxiedConnection
        else:
            super()._on_backlogged(conn, mask, now)  # type: ignore[misc]

    def _read_header(self, conn: ProxiedConnection, now: float) -> None:
        try:
            received = recv_into(conn.sock, self.buffer)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, Counter.PROXY_CLOSED_EARLY)  # reset before the header was complete
            return
        if not received:
            self._close(conn, Counter.PROXY_CLOSED_EARLY)
            return
        result = conn.header.feed(self.view[:received])
        if isinstance(result, Done):
            self._header_done(conn, result, received, now)
        elif isinstance(result, Malformed):
            self.error_log.log(
                logging.WARNING,
                "closing connection from %s: bad PROXY protocol header (%s)",
                format_peer(conn.peer),
                result.reason,
                key="proxy header malformed",
            )
            self._close(conn, Counter.PROXY_MALFORMED)

    def _header_done(
        self, conn: ProxiedConnection, result: Done, received: int, now: float
    ) -> None:
        """The header is consumed: its client is the peer from now on, admission is
        decided for it, and what followed the header is echoed like any data."""
        self.header_wheel.discard(conn.fd)
        if result.client is None:
            self.counters[Counter.PROXY_LOCAL] += 1  # the real peer stays
        else:
            self.counters[Counter.PROXY_PROXIED] += 1
            conn.peer = result.client
        gate = self.admission
        if gate is not None:
            ticket = gate.admit(conn.peer[0])  # type: ignore[index]  # an IP (host, port)
            if ticket == REJECTED:
                # refused as at accept (an RST), counted once: the gate counted it already
                reason = gate.refused
                self.counters[reason] -= 1
                reset_on_close(conn.sock)
                self._close(conn, reason)
                return
            conn.ticket = ticket
        conn.pending = NOTHING_PENDING
        conn.last_active = now
        if self.idle_wheel is not None:
            self.idle_wheel.add(conn.fd, conn, now + self.idle_timeout)
        start = result.data_start
        if start >= received:
            return
        view = self.view
        try:
            sent = send(conn.sock, view[start:received])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn, Counter.CLOSED_RESET)
            return
        size = received - start
        self.bytes_in += size
        self.bytes_out += sent
        conn.bytes_in += size
        if sent < size:
            self._keep_unsent(conn, view[start + sent : received])

    def _housekeeping(self, now: float) -> None:
        if self.header_wheel:
            self._expire_headers(now)
        super()._housekeeping(now)  # type: ignore[misc]
        due = self.header_wheel.next_deadline()
        if due is not None and due < self.next_housekeeping:
            self.next_housekeeping = due

    def _expire_headers(self, now: float) -> None:
        for conn in self.header_wheel.pop_due(now):
            # an entry outlives a connection closed while awaiting: skip those
            if self.connections.get(conn.fd) is conn and conn.pending is AWAITING_HEADER:
                self.error_log.log(
                    logging.WARNING,
                    "closing connection from %s: no complete PROXY protocol header "
                    "within proxy_header_timeout (%gs)",
                    format_peer(conn.peer),
                    self.header_timeout,
                    key="proxy header timeout",
                )
                self._close(conn, Counter.PROXY_TIMEOUT)
