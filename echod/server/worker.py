"""A worker: one level-triggered epoll loop that accepts on the shared listeners
and echoes every byte back (RFC 862), serving many connections at once.

Hot path (inlined in ``_loop``): ``recv_into`` a preallocated buffer, ``send``
straight back, and keep only the bytes the kernel refused. While a connection
has ``max_buffer`` bytes pending it is not read, so memory stays bounded
whatever clients do. Idle and lifetime deadlines live in timer wheels, touched
per connection, never per event.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import math
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import NoReturn

from echod import exitcodes, logs, procname, rundir
from echod.cidr import AddressPolicy, NetworkSet
from echod.config import Config
from echod.limits.admission import (
    REJECTED,
    AdmissionGate,
    SharedLimits,
    address_policy,
    reject,
    reset_on_close,
    tcp_limits_configured,
)
from echod.scoreboard import (
    NUM_COUNTERS,
    UDP_DROP_SOCKETS_PER_SLOT,
    Counter,
    DropPairs,
    State,
    WorkerSlot,
)
from echod.server.access import format_peer
from echod.server.balance import ASIDE_RECHECK, NUDGE, AcceptBalancer, AcceptState
from echod.server.drain import DrainSchedule
from echod.server.listeners import Listener
from echod.server.proxy import Done, Malformed, ProxyHeaderParser
from echod.server.signals import SignalQueue
from echod.server.timeouts import TimeoutWheel
from echod.server.udp import BUFFER_SIZE as DATAGRAM_BUFFER_SIZE
from echod.server.udp import DatagramEcho, build_source_check

log = logging.getLogger("echod.worker")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP
AF_UNIX = int(socket.AF_UNIX)
ACCEPT_BATCH = 64
EMFILE_PAUSE = 0.5  # seconds to stop accepting when out of file descriptors
READ_BUFFER_SIZE = 256 * 1024
DRAIN_LIMIT = 64 * 1024  # bytes read and dropped after shutdown(SHUT_WR), before close
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
ERROR_LOG_INTERVAL = 10.0  # seconds: a repeated error is logged once per interval
MEMORY_SAMPLE_INTERVAL = 3.0  # seconds between samples of our own USS for max_worker_memory
WORKER_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR2,
    NUDGE,
)


class Connection:
    __slots__ = (
        "accepted_at",
        "bytes_in",
        "bytes_out",
        "fd",
        "last_active",
        "peer",
        "peer_eof",
        "pending",
        "reading",
        "recv_into",
        "send",
        "sock",
        "ticket",
    )

    def __init__(self, sock: socket.socket, peer: object, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        # bound once here rather than looked up on every event
        self.recv_into = sock.recv_into
        self.send = sock.send
        self.peer = peer
        self.pending = bytearray()  # echo bytes the kernel did not take yet
        self.peer_eof = False  # the client shut down its write side
        self.reading = True
        self.last_active = now  # last time bytes moved either way
        self.accepted_at = now
        self.bytes_in = 0
        self.bytes_out = 0
        self.ticket: int | None = None  # counted by the AdmissionGate: release at close


# Called with each stream connection, and the counter of why it ends, just before
# its socket closes: the access log (echod.server.access) is one.
CloseHook = Callable[[Connection, Counter], None]


class MemoryLimit:
    """``max_worker_memory``: is this worker's unique memory (USS) over the limit?

    Reading USS parses /proc/self/smaps (about a millisecond), so housekeeping
    asks every ``MEMORY_SAMPLE_INTERVAL``, the first time that long after start;
    never per connection or per event. ``sample`` returns our USS in bytes (see
    :func:`own_uss_sampler`) or raises OSError.
    """

    def __init__(self, limit: int, sample: Callable[[], int], now: float) -> None:
        self.limit = limit
        self.sample = sample
        self.next_sample = now + MEMORY_SAMPLE_INTERVAL

    def exceeded(self, now: float) -> int:
        """If a sample is due and above the limit, that sample (bytes); else 0."""
        if now < self.next_sample:
            return 0
        self.next_sample = now + MEMORY_SAMPLE_INTERVAL
        uss = self.sample()
        return uss if uss > self.limit else 0


def own_uss_sampler() -> Callable[[], int]:
    """This process's USS through psutil, with the Process object made once."""
    # Imported here, in the worker that samples: the master imports this module.
    import psutil

    process = psutil.Process()

    def sample() -> int:
        try:
            return int(process.memory_full_info().uss)
        except psutil.Error as exc:
            raise OSError(str(exc) or type(exc).__name__) from exc

    return sample


@dataclass
class WorkerIdentity:
    worker_id: int
    generation: int
    master_pid: int


class Worker:
    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        slot: WorkerSlot,
        identity: WorkerIdentity,
        master_alive_fd: int,
        limits: SharedLimits,
    ) -> None:
        self.config = config
        self.listeners = {listener.fileno(): listener for listener in listeners}
        self.registered: set[int] = set()  # listeners in our epoll set
        self.heartbeat_interval = min(1.0, config.worker_timeout / 4)
        self.balancer = AcceptBalancer(slot, self.heartbeat_interval)
        self.slot = slot
        self.identity = identity
        self.master_alive_fd = master_alive_fd
        self.epoll = select.epoll()
        self.connections: dict[int, Connection] = {}
        self.idle_timeout = config.idle_timeout
        self.max_lifetime = config.max_connection_lifetime
        self.idle_wheel: TimeoutWheel[Connection] | None = (
            TimeoutWheel.for_timeout(self.idle_timeout) if self.idle_timeout else None
        )
        self.lifetime_wheel: TimeoutWheel[Connection] | None = (
            TimeoutWheel.for_timeout(self.max_lifetime) if self.max_lifetime else None
        )
        # how soon after an accept the first deadline can fall
        self.shortest_timeout = min(t for t in (self.idle_timeout, self.max_lifetime, 1e9) if t)
        self.buffer = bytearray(min(READ_BUFFER_SIZE, config.max_buffer))
        self.view = memoryview(self.buffer)
        self.max_buffer = config.max_buffer
        self.accepting = False
        self.accept_resume_at = 0.0
        self.capacity_paused = False
        self.draining = False
        self.drain_deadline = 0.0
        self.drain_schedule = DrainSchedule(config.close_spread)
        self.stopping = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.accepted = 0
        self.counters = [0] * NUM_COUNTERS
        policy = address_policy(config)  # one for TCP and UDP: the same lists
        # None when no TCP limit is configured: the accept path then checks nothing
        self.admission = (
            AdmissionGate(config, limits.connections, identity.worker_id - 1, self.counters, policy)
            if tcp_limits_configured(config)
            else None
        )
        self.datagram_echoes = self._datagram_echoes(limits, policy)
        self.published_drops: DropPairs = ()
        self.recycle_after = _recycle_threshold(config, identity.worker_id)
        self.recycling = False  # asked the master for a replacement (at most once)
        self.memory_limit = (
            MemoryLimit(config.max_worker_memory, own_uss_sampler(), time.monotonic())
            if config.max_worker_memory
            else None
        )
        self.next_housekeeping = 0.0
        self.error_log = logs.RateLimitedLog(log, ERROR_LOG_INTERVAL)
        self.signals: SignalQueue | None = None

    # -- life cycle ----------------------------------------------------------------
    def run(self) -> NoReturn:
        try:
            self._boot()
        except Exception as exc:  # anything before serving is fatal: stop the crash loop
            log.error("worker failed to start: %s", exc, exc_info=True)
            os._exit(exitcodes.WORKER_BOOT_FATAL)
        try:
            self._loop()
        except Exception:
            log.critical("worker crashed", exc_info=True)
            os._exit(exitcodes.FAILURE)
        self._close_all(Counter.CLOSED_SHUTDOWN)
        self._publish(time.monotonic())  # final counters: the master folds them in on reap
        self.error_log.flush()
        log.info("worker exiting")
        logging.shutdown()
        os._exit(exitcodes.OK)

    def _boot(self) -> None:
        self.signals = SignalQueue(WORKER_SIGNALS)
        # The master blocked signals around fork(); ours are installed now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        _enable_stack_dumps(self.config)
        for listener in self.listeners.values():
            if not listener.is_datagram and listener.sock.family != socket.AF_UNIX:
                # accepted sockets inherit it: one call here instead of one per connection
                listener.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.epoll.register(self.signals.fileno(), EPOLLIN)
        self.epoll.register(self.master_alive_fd, EPOLLIN)
        self.balancer.open()
        if os.getppid() != self.identity.master_pid:
            log.warning("master died while this worker started; exiting")
            os._exit(exitcodes.OK)
        self._resume_accepting()
        now = time.monotonic()
        self.slot.set_state(State.READY)
        self.slot.heartbeat(now)
        log.debug("worker serving", extra={"fields": {"generation": self.identity.generation}})

    def _loop(self) -> None:
        # The hot path is written out here rather than called: a readable connection
        # with nothing queued is read into the worker's buffer and echoed straight
        # back. Everything else (backpressure, half-close, errors, listeners,
        # signals) goes through methods.
        poll = self.epoll.poll
        find = self.connections.get
        buffer = self.buffer
        view = self.view
        monotonic = time.monotonic
        reset = Counter.CLOSED_RESET
        while not self.stopping:
            now = monotonic()
            if now >= self.next_housekeeping:
                self._housekeeping(now)
            events = poll(max(0.0, self.next_housekeeping - now))
            now = monotonic()
            moved_in = moved_out = 0
            for fd, mask in events:
                conn = find(fd)
                if conn is None:
                    self._on_control_event(fd, now)
                    continue
                if conn.pending:
                    self._on_backlogged(conn, mask, now)
                    continue
                # Nothing queued, so the connection is registered for EPOLLIN only and
                # whatever woke us (data, EOF, an error) is for recv to report.
                try:
                    received = conn.recv_into(buffer)
                except BlockingIOError:
                    continue
                except OSError:
                    self._close(conn, reset)
                    continue
                if not received:
                    self._on_peer_eof(conn)
                    continue
                try:
                    sent = conn.send(view[:received])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(conn, reset)
                    continue
                moved_in += received
                moved_out += sent
                conn.bytes_in += received
                conn.bytes_out += sent
                conn.last_active = now
                if sent < received:
                    self._keep_unsent(conn, view[sent:received])
            self.bytes_in += moved_in
            self.bytes_out += moved_out
            if self.draining and (not self.connections or now >= self.drain_deadline):
                if self.connections:
                    log.info("graceful timeout: closing %d connection(s)", len(self.connections))
                self.stopping = True

    def _on_control_event(self, fd: int, now: float) -> None:
        listener = self.listeners.get(fd)
        if listener is not None:
            if listener.is_datagram:
                self.datagram_echoes[fd].on_readable()
            else:
                before = self.accepted
                self._accept(
                    listener, now, self.balancer.accept_budget(len(self.connections), ACCEPT_BATCH)
                )
                if self.accepted != before:
                    self._after_accepting(listener, now)
        elif self.signals is not None and fd == self.signals.fileno():
            self._on_signals()
        elif fd == self.master_alive_fd:
            log.warning(
                "master is gone; closing %d connection(s) and exiting", len(self.connections)
            )
            self.stopping = True

    def _housekeeping(self, now: float) -> None:
        next_close = self._spread_closes(now) if self.draining else math.inf
        if self.idle_wheel:
            self._expire_idle(now)
        if self.lifetime_wheel:
            self._expire_lifetimes(now)
        if (
            not self.accepting
            and not self.draining
            and not self.capacity_paused
            and now >= self.accept_resume_at
        ):
            self._resume_accepting()
        standing_aside = self.balancer.state == AcceptState.ASIDE
        if standing_aside and self.balancer.should_rejoin(len(self.connections)):
            self._rejoin()
            standing_aside = False
        if self.accepting and not standing_aside:
            self._sweep_listeners(now)
        if self.memory_limit is not None:
            self._check_memory(now)
        self._publish(now)
        self.error_log.flush()
        next_tick = min(now + self.heartbeat_interval, next_close)
        if self.memory_limit is not None:
            next_tick = min(next_tick, self.memory_limit.next_sample)
        for wheel in (self.idle_wheel, self.lifetime_wheel):
            if wheel:
                next_tick = min(next_tick, wheel.next_deadline() or next_tick)
        if not self.accepting and self.accept_resume_at > now:
            next_tick = min(next_tick, self.accept_resume_at)
        if standing_aside:
            next_tick = min(next_tick, now + ASIDE_RECHECK)
        self.next_housekeeping = next_tick

    def _publish(self, now: float) -> None:
        counters = self.counters
        counters[Counter.ACCEPTED] = self.accepted
        counters[Counter.BYTES_IN] = self.bytes_in
        counters[Counter.BYTES_OUT] = self.bytes_out
        self.slot.publish(now, len(self.connections), counters)
        if self.datagram_echoes:
            drops = tuple(
                (echo.inode, echo.kernel_drops)
                for echo in self.datagram_echoes.values()
                if echo.kernel_drops
            )
            if drops != self.published_drops:
                if len(drops) > UDP_DROP_SOCKETS_PER_SLOT >= len(self.published_drops):
                    log.warning(  # once: the next time, the published pairs are full
                        "kernel drops on more than %d UDP sockets: the others are not counted",
                        UDP_DROP_SOCKETS_PER_SLOT,
                    )
                self.slot.publish_udp_drops(drops)
                self.published_drops = drops

    def _on_signals(self) -> None:
        assert self.signals is not None
        for signum in self.signals.drain():
            if signum == signal.SIGTERM:
                self._start_draining("stop requested")
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                log.info("fast stop: closing %d connection(s)", len(self.connections))
                self.stopping = True
            elif signum == signal.SIGUSR1:
                logs.reopen_log_files()
            elif signum == NUDGE:  # a peer took more than its share: our turn again?
                self.next_housekeeping = 0.0
            # HUP, TTIN, TTOU, USR2 are the master's business

    def _start_draining(self, why: str) -> None:
        now = time.monotonic()
        # the master wrote our limit before its TERM: reload_timeout or graceful_timeout
        limit = self.slot.drain_timeout() or self.config.graceful_timeout
        self.drain_deadline = self.drain_schedule.begin(now, limit)
        self.next_housekeeping = 0.0
        if self.draining:  # a stop while a reload's drain runs: only ever sooner
            return
        log.info("draining (%s): %d connection(s) open", why, len(self.connections))
        self.draining = True
        self._pause_accepting()
        for listener in self.listeners.values():
            # EPOLLEXCLUSIVE may have woken only us for connections already queued:
            # take them before letting go, or they would wait for the next arrival.
            if not listener.is_datagram:
                self._accept_all_queued(listener, now)
            listener.close(unlink=False)  # our copy only: the master owns the socket
        self.listeners.clear()
        self.slot.set_state(State.DRAINING)

    def _spread_closes(self, now: float) -> float:
        """close_spread: close the connections due now; return when more are due."""
        count, next_close = self.drain_schedule.due(now, len(self.connections))
        for conn in list(islice(self.connections.values(), count)):
            _shutdown_gently(conn.sock)
            self._close(conn, Counter.CLOSED_SHUTDOWN)
        return next_close

    def _check_memory(self, now: float) -> None:
        assert self.memory_limit is not None
        limit = self.memory_limit.limit
        try:
            uss = self.memory_limit.exceeded(now)
        except OSError as exc:
            log.warning(
                "max_worker_memory: cannot read this worker's memory (%s); "
                "not checking it any more",
                exc,
            )
            self.memory_limit = None
            return
        if uss:
            self._request_recycling("recycling: memory %d bytes > max_worker_memory %d", uss, limit)

    def _request_recycling(self, why: str, *args: object) -> None:
        """Ask the master for a replacement, once; it sends TERM once that one serves."""
        self.memory_limit = None  # nothing more to decide: we are on our way out
        if self.recycling or self.draining:
            return
        self.recycling = True
        log.info(why, *args)
        self.slot.set_state(State.RETIRING)

    # -- accepting (which worker accepts: see echod.server.balance) ----------------------------
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

    def _rejoin(self) -> None:
        for fd, stream in self.listeners.items():
            if not stream.is_datagram and fd not in self.registered:
                self._listen(fd)
        self.balancer.set_state(AcceptState.LISTENING)

    def _accept(self, listener: Listener, now: float, budget: int = ACCEPT_BATCH) -> None:
        # socket.accept() would turn the family and type into enums for every
        # connection (a tenth of the accept path's Python time): wrap the fd ourselves.
        accept_fd = listener.sock._accept
        family, kind, proto = listener.shape
        connections = self.connections
        limit = self.config.max_connections
        gate = self.admission if family != AF_UNIX else None
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
            client = socket.socket(family, kind, proto, fd)
            ticket = None
            if gate is not None:
                ticket = gate.admit(peer[0])
                if ticket == REJECTED:
                    reject(client)
                    continue
            client.setblocking(False)
            conn = Connection(client, peer, now)
            conn.ticket = ticket
            connections[conn.fd] = conn
            self.epoll.register(conn.fd, EPOLLIN)
            if self.idle_wheel is not None:
                self.idle_wheel.add(conn.fd, conn, now + self.idle_timeout)
            if self.lifetime_wheel is not None:
                self.lifetime_wheel.add(conn.fd, conn, now + self.max_lifetime)
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

    def _sweep_listeners(self, now: float) -> None:
        # EPOLLEXCLUSIVE hands a connection's wakeup to one waiter. A peer that took
        # it and hung before accepting (stopped, stuck) leaves the connection queued
        # until the next arrival wakes someone else, which may never come: so every
        # housekeeping tick, a listening worker looks at the queues itself.
        for fd in [fd for fd in self.registered if not self.listeners[fd].is_datagram]:
            self._on_control_event(fd, now)

    def _pause_at_capacity(self) -> None:
        self._pause_accepting()
        self.capacity_paused = True  # resumed by _close when a connection leaves
        self.counters[Counter.REJECTED_MAX_CONNECTIONS] += 1

    def _accept_all_queued(self, listener: Listener, now: float) -> None:
        for _ in range(1000):  # bounded: the backlog is finite, but stay safe
            before = self.accepted
            self._accept(listener, now)
            if self.accepted - before < ACCEPT_BATCH:
                return

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

    # -- echoing (the common case is inlined in _loop) ------------------------------
    def _keep_unsent(self, conn: Connection, unsent: memoryview) -> None:
        """The kernel took only part of an echo: queue the rest, stop reading if full."""
        conn.pending += unsent
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
            received = conn.recv_into(self.buffer, min(room, len(self.buffer)))
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
        pending += self.view[:received]
        if len(pending) >= self.max_buffer:
            conn.reading = False
            self.epoll.modify(conn.fd, EPOLLOUT)

    def _flush(self, conn: Connection, now: float) -> None:
        pending = conn.pending
        try:
            sent = conn.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, Counter.CLOSED_RESET)
            return
        self.bytes_out += sent
        conn.bytes_out += sent
        conn.last_active = now
        del pending[:sent]
        if pending:
            if not conn.reading and not conn.peer_eof and len(pending) < self.max_buffer:
                conn.reading = True
                self.epoll.modify(conn.fd, EPOLLOUT | EPOLLIN)
            return
        if conn.peer_eof:
            self._close(conn, Counter.CLOSED_EOF)  # everything echoed after half-close
            return
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
        self.balancer.set_open(len(self.connections))
        if (
            self.capacity_paused
            and len(self.connections) < self.config.max_connections
            and not self.draining
        ):
            self._resume_accepting()
        elif (
            self.balancer.state == AcceptState.ASIDE
            and not self.draining
            and self.balancer.should_rejoin(len(self.connections))
        ):
            self._rejoin()

    def _close_all(self, reason: Counter) -> None:
        for conn in list(self.connections.values()):
            _shutdown_gently(conn.sock)
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
            _shutdown_gently(conn.sock)
            self._close(conn, Counter.CLOSED_LIFETIME)

    # -- UDP -----------------------------------------------------------------------
    def _datagram_echoes(
        self, limits: SharedLimits, policy: AddressPolicy | None
    ) -> dict[int, DatagramEcho]:
        datagram_listeners = [lst for lst in self.listeners.values() if lst.is_datagram]
        if not datagram_listeners:
            return {}
        buffer = bytearray(DATAGRAM_BUFFER_SIZE)  # one for all: a worker reads one at a time
        check = build_source_check(self.config, limits.udp_buckets, policy)
        return {
            lst.fileno(): DatagramEcho(lst.sock, self.config, check, buffer, self.counters)
            for lst in datagram_listeners
        }


class _ReportingWorker(Worker):
    """A worker that hands each connection to ``on_close`` before closing it.

    A subclass chosen once at start rather than a test in ``_close``: a worker
    without a hook does not even look for one.
    """

    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        slot: WorkerSlot,
        identity: WorkerIdentity,
        master_alive_fd: int,
        limits: SharedLimits,
        on_close: CloseHook,
    ) -> None:
        super().__init__(config, listeners, slot, identity, master_alive_fd, limits)
        self.on_close = on_close

    def _close(self, conn: Connection, reason: Counter) -> None:
        if self.connections.get(conn.fd) is conn:  # not closed already
            self.on_close(conn, reason)
        super()._close(conn, reason)


# What an awaiting connection's ``pending`` holds until its PROXY header is complete:
# truthy, so the inlined hot path hands its events to _on_backlogged (which the
# proxy-aware worker intercepts), and immutable, so nothing can append to it.
AWAITING_HEADER = b"PROXY header"


class ProxiedConnection(Connection):
    """A connection from a ``proxy_protocol_from`` source: no byte is echoed and
    no admission rule applied until its PROXY header is complete."""

    __slots__ = ("header",)

    def __init__(self, sock: socket.socket, peer: object, now: float) -> None:
        super().__init__(sock, peer, now)
        self.pending = AWAITING_HEADER  # type: ignore[assignment]  # see AWAITING_HEADER
        self.header = ProxyHeaderParser()


class _ProxyWorker(Worker):
    """A worker with ``proxy_protocol_from`` set: connections from those sources on
    its TCP listeners begin in the awaiting-header state (see echod.server.proxy).

    A subclass chosen once at start, like _ReportingWorker: without the list the
    plain Worker runs, and neither its accept path nor its echo path look for it.
    Here the untrusted connections cost one set lookup at accept; their echo path
    is the plain one.
    """

    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        slot: WorkerSlot,
        identity: WorkerIdentity,
        master_alive_fd: int,
        limits: SharedLimits,
    ) -> None:
        super().__init__(config, listeners, slot, identity, master_alive_fd, limits)
        self.trusted = NetworkSet(config.proxy_protocol_from)
        self.header_timeout = config.proxy_header_timeout
        self.header_wheel: TimeoutWheel[Connection] = TimeoutWheel.for_timeout(self.header_timeout)

    def _accept(self, listener: Listener, now: float, budget: int = ACCEPT_BATCH) -> None:
        # Worker._accept with one branch more: keep the two in step.
        family, kind, proto = listener.shape
        if family == AF_UNIX:  # no PROXY header on unix sockets: nobody to trust there
            super()._accept(listener, now, budget)
            return
        accept_fd = listener.sock._accept
        connections = self.connections
        limit = self.config.max_connections
        gate = self.admission
        trusted = self.trusted
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
            client = socket.socket(family, kind, proto, fd)
            client.setblocking(False)
            if peer[0] in trusted:
                # admission waits for the header: the balancer's address is not the client
                conn: Connection = ProxiedConnection(client, peer, now)
                connections[conn.fd] = conn
                self.epoll.register(conn.fd, EPOLLIN)
                self.header_wheel.add(conn.fd, conn, now + self.header_timeout)
                self.next_housekeeping = min(self.next_housekeeping, now + self.header_timeout)
            else:
                ticket = None
                if gate is not None:
                    ticket = gate.admit(peer[0])
                    if ticket == REJECTED:
                        reject(client)
                        continue
                conn = Connection(client, peer, now)
                conn.ticket = ticket
                connections[conn.fd] = conn
                self.epoll.register(conn.fd, EPOLLIN)
                if self.idle_wheel is not None:
                    self.idle_wheel.add(conn.fd, conn, now + self.idle_timeout)
            if self.lifetime_wheel is not None:
                self.lifetime_wheel.add(conn.fd, conn, now + self.max_lifetime)
            self.next_housekeeping = min(self.next_housekeeping, now + self.shortest_timeout)
            self.accepted += 1
            if self.accepted == self.recycle_after:
                self._request_recycling("recycling after %d connections", self.accepted)
            if len(connections) >= limit:
                self._pause_at_capacity()  # as in Worker._accept
                return

    def _on_backlogged(self, conn: Connection, mask: int, now: float) -> None:
        if conn.pending is AWAITING_HEADER:
            self._read_header(conn, now)  # type: ignore[arg-type]  # only ProxiedConnection
        else:
            Worker._on_backlogged(self, conn, mask, now)

    def _read_header(self, conn: ProxiedConnection, now: float) -> None:
        try:
            received = conn.recv_into(self.buffer)
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
        conn.pending = bytearray()
        conn.last_active = now
        if self.idle_wheel is not None:
            self.idle_wheel.add(conn.fd, conn, now + self.idle_timeout)
        start = result.data_start
        if start >= received:
            return
        view = self.view
        try:
            sent = conn.send(view[start:received])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn, Counter.CLOSED_RESET)
            return
        size = received - start
        self.bytes_in += size
        self.bytes_out += sent
        conn.bytes_in += size
        conn.bytes_out += sent
        if sent < size:
            self._keep_unsent(conn, view[start + sent : received])

    def _housekeeping(self, now: float) -> None:
        if self.header_wheel:
            self._expire_headers(now)
        super()._housekeeping(now)
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


class _ReportingProxyWorker(_ReportingWorker, _ProxyWorker):
    """Both: an access log and ``proxy_protocol_from``."""


def _shutdown_gently(sock: socket.socket) -> None:
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


def _recycle_threshold(config: Config, worker_id: int) -> int:
    if not config.max_connections_per_child:
        return 0
    jitter = config.max_connections_per_child_jitter
    # spread restarts so that workers started together do not recycle together
    spread = int.from_bytes(os.urandom(4), "little") % (jitter + 1) if jitter else 0
    return config.max_connections_per_child + spread


def _enable_stack_dumps(config: Config) -> None:
    """On SIGABRT (a hung worker), write every thread's stack, then die.

    The dump goes to a file the master logs, in log_format, when it reaps us
    (faulthandler writes raw text from C; it could not follow the JSON format).
    """
    path = logs.stack_dump_path(os.path.dirname(config.pidfile_path), os.getpid())
    try:
        # A fresh file of ours, never a planted symlink or a file someone else opened
        target = rundir.create_exclusive(path, os.O_WRONLY)
    except OSError:
        fds = logs.log_file_descriptors()
        target = fds[0] if fds else sys.stderr.fileno()
    try:
        faulthandler.enable(file=target, all_threads=True)
    except (OSError, ValueError, RuntimeError):
        pass


def start_worker(
    config: Config,
    listeners: list[Listener],
    slot: WorkerSlot,
    identity: WorkerIdentity,
    master_alive_fd: int,
    limits: SharedLimits,
    on_close: CloseHook | None = None,
) -> NoReturn:
    """Entry point in the freshly forked child. ``on_close``: see :data:`CloseHook`."""
    logs.set_role(f"worker {identity.worker_id}")
    procname.set_title(f"worker {identity.worker_id} (generation {identity.generation})")
    procname.die_with_parent()
    # decided once: without a hook, the plain Worker runs and its close path pays
    # nothing; without proxy_protocol_from (or a TCP listener), its accept path neither
    proxied = bool(config.proxy_protocol_from) and any(
        not listener.is_datagram and listener.sock.family != socket.AF_UNIX
        for listener in listeners
    )
    worker: Worker
    if on_close is None:
        plain = _ProxyWorker if proxied else Worker
        worker = plain(config, listeners, slot, identity, master_alive_fd, limits)
    else:
        reporting = _ReportingProxyWorker if proxied else _ReportingWorker
        worker = reporting(config, listeners, slot, identity, master_alive_fd, limits, on_close)
    worker.run()
