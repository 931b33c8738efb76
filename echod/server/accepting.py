"""A worker's accept side: taking connections off the shared listeners, and
which worker takes them (the balance itself is decided in echod.server.balance).

One accept loop serves every listener. What differs between listeners (unix
sockets skip admission; ``proxy_protocol_from`` sources wait for a header)
is only how an accepted socket becomes a :class:`Connection`: an *opener*
chosen once per accept call, see :meth:`Accepting._opener`.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections.abc import Callable

from echod.config import Config
from echod.limits.admission import REJECTED, AdmissionGate, reject
from echod.logs import RateLimitedLog
from echod.scoreboard import Counter
from echod.server.balance import ASIDE_RECHECK, AcceptBalancer, AcceptState
from echod.server.connection import EPOLLIN, Connection
from echod.server.listeners import Listener
from echod.server.timeouts import TimeoutWheel

ACCEPT_BATCH = 64
EMFILE_PAUSE = 0.5  # seconds to stop accepting when out of file descriptors
AF_UNIX = int(socket.AF_UNIX)
FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
ACCEPT_ERROR_COUNTERS = {
    errno.EMFILE: Counter.ACCEPT_EMFILE,
    errno.ENFILE: Counter.ACCEPT_ENFILE,
    errno.ENOMEM: Counter.ACCEPT_ENOMEM,
    errno.ENOBUFS: Counter.ACCEPT_ENOMEM,
    errno.ECONNABORTED: Counter.ACCEPT_ABORTED,
    errno.EPROTO: Counter.ACCEPT_ABORTED,
}

# An accepted socket, its descriptor, its peer address and the time -> its Connection, or None
# when admission refused it (the opener has dealt with the socket then).
Opener = Callable[[socket.socket, int, object, float], Connection | None]


class Accepting:
    """The accept side of :class:`echod.server.worker.Worker` (a mixin: the
    attributes below are the worker's)."""

    config: Config
    listeners: dict[int, Listener]
    registered: set[int]
    balancer: AcceptBalancer
    epoll: select.epoll
    connections: dict[int, Connection]
    counters: list[int]
    admission: AdmissionGate | None
    accepting: bool
    accept_resume_at: float
    capacity_paused: bool
    draining: bool
    accepted: int
    recycle_after: int
    next_housekeeping: float
    shortest_timeout: float
    idle_timeout: float
    max_lifetime: float
    idle_wheel: TimeoutWheel[Connection] | None
    lifetime_wheel: TimeoutWheel[Connection] | None
    # accepted and not read yet: the loop reads them before polling again (the
    # client has usually sent by the time we accept)
    just_accepted: list[int]
    error_log: RateLimitedLog
    _publish: Callable[[float], None]
    _request_recycling: Callable[..., None]

    # -- the accept loop -----------------------------------------------------------
    def _accept(self, listener: Listener, now: float, budget: int = ACCEPT_BATCH) -> None:
        # socket.accept() would turn the family and type into enums for every
        # connection (a tenth of the accept path's Python time): wrap the fd ourselves.
        accept_fd = listener.sock._accept
        family, kind, proto = listener.shape
        open_connection = self._opener(family)
        connections = self.connections
        limit = self.config.max_connections
        register = self.epoll.register
        lifetime_wheel = self.lifetime_wheel
        just_accepted = self.just_accepted
        for _ in range(budget):
            if len(connections) >= limit:
                self._pause_at_capacity()
                return
            try:
                fd, peer = accept_fd()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(listener, exc, now)
                return
            conn = open_connection(socket.socket(family, kind, proto, fd), fd, peer, now)
            if conn is None:
                continue
            connections[fd] = conn
            register(fd, EPOLLIN)
            just_accepted.append(fd)
            if lifetime_wheel is not None:
                lifetime_wheel.add(fd, conn, now + self.max_lifetime)
            self.next_housekeeping = min(self.next_housekeeping, now + self.shortest_timeout)
            self.accepted += 1
            if self.accepted == self.recycle_after:
                self._request_recycling("recycling after %d connections", self.accepted)
            if len(connections) >= limit:
                # Leave the wait queue as soon as we are full, not when next woken:
                # EPOLLEXCLUSIVE would hand that wakeup to us alone, and the
                # connection would wait for the next arrival to wake a worker with room.
                self._pause_at_capacity()
                return

    def _opener(self, family: int) -> Opener:
        """How this worker turns a socket accepted on a listener of ``family`` into a
        connection: admission first where it applies (never on unix sockets)."""
        if family == AF_UNIX or self.admission is None:
            return self._open
        return self._open_admitted

    def _open(self, client: socket.socket, fd: int, peer: object, now: float) -> Connection:
        client.setblocking(False)
        conn = Connection(client, fd, peer, now)
        if self.idle_wheel is not None:
            self.idle_wheel.add(conn.fd, conn, now + self.idle_timeout)
        return conn

    def _open_admitted(
        self, client: socket.socket, fd: int, peer: object, now: float
    ) -> Connection | None:
        assert self.admission is not None
        ticket = self.admission.admit(peer[0])  # type: ignore[index]  # an IP (host, port)
        if ticket == REJECTED:
            reject(client)
            return None
        conn = self._open(client, fd, peer, now)
        conn.ticket = ticket
        return conn

    # -- errors --------------------------------------------------------------------
    def _accept_failed(self, listener: Listener, exc: OSError, now: float) -> None:
        if exc.errno != errno.EINTR:
            self.counters[ACCEPT_ERROR_COUNTERS.get(exc.errno, Counter.ACCEPT_OTHER)] += 1
        if exc.errno in FD_EXHAUSTED:
            self._out_of_descriptors(exc, now)
        elif exc.errno not in ACCEPT_TRANSIENT:
            self.counters[Counter.ERRORS] += 1
            self.error_log.log(
                logging.WARNING,
                "accept on %s failed: %s",
                listener.bound,
                exc.strerror,
                key=f"accept {listener.bound} {exc.errno}",
            )

    def _out_of_descriptors(self, exc: OSError, now: float) -> None:
        self._pause_accepting()
        self.accept_resume_at = now + EMFILE_PAUSE
        self.next_housekeeping = min(self.next_housekeeping, self.accept_resume_at)
        self.counters[Counter.ACCEPT_PAUSED_EMFILE] += 1
        self.error_log.log(
            logging.WARNING,
            "out of file descriptors (%s) with %d connection(s) open: pausing accept for %.1fs",
            exc.strerror,
            len(self.connections),
            EMFILE_PAUSE,
            key="out of file descriptors",
        )

    # -- in and out of the listeners' wait queues (see echod.server.balance) ---------
    def _on_listener(self, listener: Listener, now: float) -> None:
        """A stream listener is readable: accept our share, then requeue or stand aside."""
        before = self.accepted
        self._accept(
            listener, now, self.balancer.accept_budget(len(self.connections), ACCEPT_BATCH)
        )
        if self.accepted != before:
            self._after_accepting(listener, now)

    def _listen(self, fd: int) -> None:
        # EPOLLEXCLUSIVE: one worker woken per connection, not all of them; the
        # registration also puts us at the back of the listener's wake-up queue.
        self.epoll.register(fd, EPOLLIN | select.EPOLLEXCLUSIVE)
        self.registered.add(fd)

    def _unlisten(self, fd: int) -> None:
        self.epoll.unregister(fd)
        self.registered.discard(fd)

    def _resume_accepting(self) -> None:
        for fd in self.listeners:
            if fd not in self.registered:
                self._listen(fd)
        self.accepting = True
        self.capacity_paused = False
        self.balancer.set_state(AcceptState.LISTENING)

    def _pause_accepting(self) -> None:
        for fd in list(self.registered):
            self._unlisten(fd)
        self.accepting = False
        self.balancer.set_state(AcceptState.OFF)

    def _pause_at_capacity(self) -> None:
        self._pause_accepting()
        self.capacity_paused = True  # resumed by _after_close when a connection leaves
        self.counters[Counter.REJECTED_MAX_CONNECTIONS] += 1

    def _after_accepting(self, listener: Listener, now: float) -> None:
        """Publish our load, then go to the back of the queue or stand aside."""
        self._publish(now)  # all counters, so that readers see them agree with the load
        if not self.accepting or not self.balancer.has_peers():
            return
        if self.balancer.should_stand_aside(len(self.connections)):
            for fd, stream in self.listeners.items():
                if not stream.is_datagram and fd in self.registered:
                    self._unlisten(fd)
            self.next_housekeeping = min(self.next_housekeeping, now + ASIDE_RECHECK)
            return
        # Re-registering moves us behind the workers already waiting, so that the
        # next connection wakes one of them: the kernel wakes waiters in order.
        fd = listener.fileno()
        self._unlisten(fd)
        self._listen(fd)

    def _after_close(self) -> None:
        """A connection left: publish the load; take more if we stopped for lack of room
        or stood aside."""
        open_connections = len(self.connections)
        self.balancer.set_open(open_connections)
        if self.draining:
            return
        if self.capacity_paused and open_connections < self.config.max_connections:
            self._resume_accepting()
        elif self.balancer.state == AcceptState.ASIDE and self.balancer.should_rejoin(
            open_connections
        ):
            self._rejoin()

    def _rejoin(self) -> None:
        for fd, stream in self.listeners.items():
            if not stream.is_datagram and fd not in self.registered:
                self._listen(fd)
        self.balancer.set_state(AcceptState.LISTENING)

    def _sweep_listeners(self, now: float) -> None:
        # EPOLLEXCLUSIVE hands a connection's wakeup to one waiter. A peer that took
        # it and hung before accepting (stopped, stuck) leaves the connection queued
        # until the next arrival wakes someone else, which may never come: so every
        # housekeeping tick, a listening worker looks at the queues itself.
        for fd in [fd for fd in self.registered if not self.listeners[fd].is_datagram]:
            self._on_listener(self.listeners[fd], now)

    def _accept_all_queued(self, listener: Listener, now: float) -> None:
        for _ in range(1000):  # bounded: the backlog is finite, but stay safe
            before = self.accepted
            self._accept(listener, now)
            if self.accepted - before < ACCEPT_BATCH:
                return
