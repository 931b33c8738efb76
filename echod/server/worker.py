"""A worker: one level-triggered epoll loop that accepts on the shared listeners
and echoes every byte back (RFC 862), serving many connections at once.

Hot path (written out in ``Worker._loop``): ``recv_into`` a preallocated buffer,
``send`` straight back, and keep only the bytes the kernel refused. The rest
lives beside it, one module per side of the worker:

* echod.server.connection: a connection's other events (backpressure, half-close),
  its deadlines and its close;
* echod.server.accepting: the accept loop and the place in the listeners' queue;
* echod.server.proxied: PROXY headers, for ``proxy_protocol_from`` sources;
* echod.server.udp: datagrams; echod.server.drain: when a draining worker closes.

Here: the loop, housekeeping, signals, draining and the choice of worker class.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from itertools import islice
from typing import NoReturn

from echod import exitcodes, logs, procname, rundir
from echod.cidr import AddressPolicy
from echod.config import Config
from echod.limits.admission import (
    AdmissionGate,
    SharedLimits,
    address_policy,
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
from echod.server.accepting import Accepting
from echod.server.balance import ASIDE_RECHECK, NUDGE, AcceptBalancer, AcceptState
from echod.server.connection import (
    EPOLLIN,
    CloseHook,
    Connection,
    StreamEcho,
    shutdown_gently,
)
from echod.server.connection import recv_into as socket_recv_into
from echod.server.connection import send as socket_send
from echod.server.drain import DrainSchedule
from echod.server.listeners import Listener
from echod.server.proxied import ProxyHeaders
from echod.server.signals import SignalQueue
from echod.server.timeouts import TimeoutWheel
from echod.server.udp import DatagramEcho, build_source_check, datagram_echoes
from echod.server.worker_memory import MemoryLimit, own_uss_sampler

log = logging.getLogger("echod.worker")

READ_BUFFER_SIZE = 256 * 1024
ERROR_LOG_INTERVAL = 10.0  # seconds: a repeated error is logged once per interval
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


@dataclass
class WorkerIdentity:
    worker_id: int
    generation: int
    master_pid: int


class Worker(Accepting, StreamEcho):
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
        self.just_accepted: list[int] = []
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
        self._publish_udp_drops()
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
                # set (or cleared) by every worker: a reload may have changed it
                listener.sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, self.config.defer_accept
                )
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
        # signals) goes through methods. Connections accepted while handling the
        # events are then handled as readable, without waiting for the next poll:
        # their client has usually sent already.
        poll = self.epoll.poll
        find = self.connections.get
        buffer = self.buffer
        view = self.view
        monotonic = time.monotonic
        reset = Counter.CLOSED_RESET
        recv_into, send = socket_recv_into, socket_send
        just_accepted = self.just_accepted
        now = monotonic()
        while not self.stopping:
            # `now` is from just after the last poll: handling its events took
            # microseconds, and housekeeping is not that precise
            if now >= self.next_housekeeping:
                self._housekeeping(now)
            timeout = self.next_housekeeping - now
            events = poll(timeout if timeout > 0.0 else 0.0)
            now = monotonic()
            moved_in = moved_out = 0
            if just_accepted:  # accepted by housekeeping's sweep: readable too
                events += [(new, EPOLLIN) for new in just_accepted]
                just_accepted.clear()
            for fd, mask in events:
                conn = find(fd)
                if conn is None:
                    self._on_control_event(fd, now)
                    if just_accepted:  # iterating a list goes on over what is appended
                        events += [(new, EPOLLIN) for new in just_accepted]
                        just_accepted.clear()
                    continue
                if conn.pending:
                    self._on_backlogged(conn, mask, now)
                    continue
                # Nothing queued, so the connection is registered for EPOLLIN only and
                # whatever woke us (data, EOF, an error) is for recv to report.
                try:
                    received = recv_into(conn.sock, buffer)
                except BlockingIOError:
                    continue
                except OSError:
                    self._close(conn, reset)
                    continue
                if not received:
                    self._on_peer_eof(conn)
                    continue
                try:
                    sent = send(conn.sock, view[:received])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(conn, reset)
                    continue
                moved_in += received
                moved_out += sent
                conn.bytes_in += received
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
                self._on_listener(listener, now)
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
        self._publish_udp_drops()
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
        """Every counter, with the load: after each accept batch and each tick."""
        counters = self.counters
        counters[Counter.ACCEPTED] = self.accepted
        counters[Counter.BYTES_IN] = self.bytes_in
        counters[Counter.BYTES_OUT] = self.bytes_out
        self.slot.publish(now, len(self.connections), counters)

    def _publish_udp_drops(self) -> None:
        """The kernel's drop count per UDP socket, when it rose (each tick, not per accept)."""
        for echo in self.datagram_echoes.values():
            echo.refresh_drops()
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
            shutdown_gently(conn.sock)
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

    # -- UDP -----------------------------------------------------------------------
    def _datagram_echoes(
        self, limits: SharedLimits, policy: AddressPolicy | None
    ) -> dict[int, DatagramEcho]:
        socks = [lst.sock for lst in self.listeners.values() if lst.is_datagram]
        if not socks:
            return {}
        check = build_source_check(self.config, limits.udp_buckets, policy)
        return datagram_echoes(socks, self.config, check, self.counters)


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


class _ProxyWorker(ProxyHeaders, Worker):
    """A worker with ``proxy_protocol_from`` set (see echod.server.proxied)."""

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
        self._init_proxy_headers()


class _ReportingProxyWorker(_ReportingWorker, _ProxyWorker):
    """Both: an access log and ``proxy_protocol_from``."""


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
