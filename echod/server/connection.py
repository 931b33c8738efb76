"""A stream connection, and everything a worker does to one after accepting it:
the echo path off the hot loop (backpressure, half-close), deadlines, closing.

The common case (nothing queued: read, echo straight back) is written out in
the worker's loop (``echod.server.worker``); every other event on a connection
comes here. While a connection has ``max_buffer`` bytes pending it is not read,
so memory stays bounded whatever clients do.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable

from echod.limits.admission import AdmissionGate
from echod.scoreboard import Counter
from echod.server.timeouts import TimeoutWheel

log = logging.getLogger("echod.worker")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP
DRAIN_LIMIT = 64 * 1024  # bytes read and dropped after shutdown(SHUT_WR), before close
# A connection's ``pending`` while nothing waits: one shared empty value, so that an
# idle connection holds no buffer of its own; a bytearray replaces it when needed.
NOTHING_PENDING = b""
# Called as recv_into(conn.sock, ...) and send(conn.sock, ...): as fast as methods
# bound on each connection, without two method objects per connection.
recv_into = socket.socket.recv_into
send = socket.socket.send


class Connection:
    __slots__ = (
        "accepted_at",
        "bytes_in",
        "fd",
        "last_active",
        "peer",
        "peer_eof",
        "pending",
        "reading",
        "sock",
        "ticket",
    )

    def __init__(self, sock: socket.socket, fd: int, peer: object, now: float) -> None:
        self.sock = sock
        self.fd = fd  # the same int object as the worker's key: one per connection
        self.peer = peer
        # echo bytes the kernel did not take yet (NOTHING_PENDING or a bytearray)
        self.pending: bytes | bytearray = NOTHING_PENDING
        self.peer_eof = False  # the client shut down its write side
        self.reading = True
        self.last_active = now  # last time bytes moved either way
        self.accepted_at = now
        self.bytes_in = 0  # echoed, or pending: bytes_out is what left of them
        self.ticket: int | None = None  # counted by the AdmissionGate: release at close

    @property
    def bytes_out(self) -> int:
        """Echoed so far: every byte read is sent or still pending (one count less to
        keep on the hot path)."""
        return self.bytes_in - len(self.pending)


# Called with each stream connection, and the counter of why it ends, just before
# its socket closes: the access log (echod.server.access) is one.
CloseHook = Callable[[Connection, Counter], None]


class StreamEcho:
    """The worker's connection handling, but for the inlined common case.

    A mixin of :class:`echod.server.worker.Worker`: the attributes below are the
    worker's, shared with its loop and its accept path.
    """

    connections: dict[int, Connection]
    epoll: select.epoll
    buffer: bytearray
    view: memoryview
    max_buffer: int
    bytes_in: int
    bytes_out: int
    counters: list[int]
    admission: AdmissionGate | None
    idle_timeout: float
    idle_wheel: TimeoutWheel[Connection] | None
    lifetime_wheel: TimeoutWheel[Connection] | None
    # a connection left: the accept side may take more (echod.server.accepting)
    _after_close: Callable[[], None]

    def _keep_unsent(self, conn: Connection, unsent: memoryview) -> None:
        """The kernel took only part of an echo: queue the rest, stop reading if full."""
        if conn.pending:
            conn.pending += unsent
        else:
            conn.pending = bytearray(unsent)
        conn.reading = len(conn.pending) < self.max_buffer
        self.epoll.modify(conn.fd, EPOLLOUT | EPOLLIN if conn.reading else EPOLLOUT)

    def _on_backlogged(self, conn: Connection, mask: int, now: float) -> None:
        """An event on a connection that still has echo bytes queued."""
        if mask & EPOLLOUT:
            self._flush(conn, now)
            if not conn.pending or self.connections.get(conn.fd) is not conn:
                return  # all flushed (unread input is reported again: level-triggered) or closed
        if mask & (EPOLLIN | EPOLLERR):
            if conn.reading:
                self._read_behind(conn, now)
            elif mask & EPOLLERR:
                self._close(conn, Counter.CLOSED_RESET)

    def _read_behind(self, conn: Connection, now: float) -> None:
        """Read while earlier bytes still wait to be sent: queue behind them, in order."""
        pending = conn.pending
        room = self.max_buffer - len(pending)
        try:
            received = recv_into(conn.sock, self.buffer, min(room, len(self.buffer)))
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, Counter.CLOSED_RESET)
            return
        if not received:
            self._on_peer_eof(conn)
            return
        self.bytes_in += received
        conn.bytes_in += received
        conn.last_active = now
        pending += self.view[:received]  # type: ignore[operator]  # a bytearray: not empty
        if len(pending) >= self.max_buffer:
            conn.reading = False
            self.epoll.modify(conn.fd, EPOLLOUT)

    def _flush(self, conn: Connection, now: float) -> None:
        pending = conn.pending
        try:
            sent = send(conn.sock, pending)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, Counter.CLOSED_RESET)
            return
        self.bytes_out += sent
        conn.last_active = now
        del pending[:sent]  # type: ignore[union-attr]  # a bytearray: not empty
        if pending:
            if not conn.reading and not conn.peer_eof and len(pending) < self.max_buffer:
                conn.reading = True
                self.epoll.modify(conn.fd, EPOLLOUT | EPOLLIN)
            return
        if conn.peer_eof:
            self._close(conn, Counter.CLOSED_EOF)  # everything echoed after half-close
            return
        conn.pending = NOTHING_PENDING  # the buffer goes: this connection may stay idle
        conn.reading = True
        self.epoll.modify(conn.fd, EPOLLIN)

    def _on_peer_eof(self, conn: Connection) -> None:
        if not conn.pending:
            self._close(conn, Counter.CLOSED_EOF)
            return
        # half-close: send back what is pending, then close
        conn.peer_eof = True
        conn.reading = False
        self.epoll.modify(conn.fd, EPOLLOUT)

    def _close(self, conn: Connection, reason: Counter) -> None:
        if self.connections.get(conn.fd) is not conn:
            return  # closed already (and the fd perhaps reused)
        del self.connections[conn.fd]
        self.counters[reason] += 1
        if self.idle_wheel is not None:
            self.idle_wheel.discard(conn.fd)
        if self.lifetime_wheel is not None:
            self.lifetime_wheel.discard(conn.fd)
        # Closing also takes the fd out of the epoll set (no other process holds it),
        # which saves an epoll_ctl per connection.
        conn.sock.close()
        if conn.ticket is not None and self.admission is not None:
            self.admission.release(conn.ticket)
            conn.ticket = None
        self._after_close()

    def _close_all(self, reason: Counter) -> None:
        for conn in list(self.connections.values()):
            shutdown_gently(conn.sock)
            self._close(conn, reason)

    def _expire_idle(self, now: float) -> None:
        assert self.idle_wheel is not None
        for conn in self.idle_wheel.pop_due(now):
            deadline = conn.last_active + self.idle_timeout
            if deadline <= now:  # no byte moved either way for idle_timeout
                log.debug("closing idle connection from %s", conn.peer)
                self._close(conn, Counter.CLOSED_IDLE)
            else:
                self.idle_wheel.add(conn.fd, conn, deadline)

    def _expire_lifetimes(self, now: float) -> None:
        assert self.lifetime_wheel is not None
        for conn in self.lifetime_wheel.pop_due(now):
            log.debug("closing connection from %s: max_connection_lifetime", conn.peer)
            shutdown_gently(conn.sock)
            self._close(conn, Counter.CLOSED_LIFETIME)


def shutdown_gently(sock: socket.socket) -> None:
    """FIN instead of RST: shut our side, drop a bounded amount of unread input."""
    try:
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < DRAIN_LIMIT:
            chunk = sock.recv(16384)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
