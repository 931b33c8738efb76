"""A worker: one level-triggered epoll loop that accepts on the shared listeners
and echoes every byte back (RFC 862), serving many connections at once.

Hot path: ``recv_into`` a preallocated buffer, ``send`` straight back, and keep
only the bytes the kernel refused. While a connection has ``max_buffer`` bytes
pending it is not read, so memory stays bounded whatever clients do.
"""

from __future__ import annotations

import collections
import errno
import faulthandler
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import NoReturn

from echod import exitcodes, logs, procname
from echod.admission import REJECTED, AdmissionGate, SharedLimits, reject, tcp_limits_configured
from echod.config import Config
from echod.listeners import Listener
from echod.scoreboard import NUM_COUNTERS, Counter, State, WorkerSlot
from echod.signals import SignalQueue
from echod.udp import BUFFER_SIZE as DATAGRAM_BUFFER_SIZE
from echod.udp import DatagramEcho, build_source_check

log = logging.getLogger("echod.worker")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP
ACCEPT_BATCH = 64
EMFILE_PAUSE = 0.5  # seconds to stop accepting when out of file descriptors
READ_BUFFER_SIZE = 256 * 1024
DRAIN_LIMIT = 64 * 1024  # bytes read and dropped after shutdown(SHUT_WR), before close
FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
ACCEPT_ERROR_COUNTERS = {
    errno.EMFILE: Counter.ACCEPT_EMFILE, errno.ENFILE: Counter.ACCEPT_ENFILE,
    errno.ENOMEM: Counter.ACCEPT_ENOMEM, errno.ENOBUFS: Counter.ACCEPT_ENOMEM,
    errno.ECONNABORTED: Counter.ACCEPT_ABORTED, errno.EPROTO: Counter.ACCEPT_ABORTED,
}
ERROR_LOG_INTERVAL = 10.0  # seconds: a repeated error is logged once per interval
WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP,
                  signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2)
# Tests set this to "boot" to prove the master ends a crash loop; nothing else reads it.
FAULT_INJECTION_ENV = "_ECHOD_TEST_FAULT"


class Connection:
    __slots__ = ("accepted_at", "fd", "last_active", "peer", "peer_eof", "pending",
                 "reading", "sock", "ticket")

    def __init__(self, sock: socket.socket, peer: object, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.pending = bytearray()
        self.peer_eof = False  # the client shut down its write side
        self.reading = True
        self.last_active = now
        self.accepted_at = now
        self.ticket: int | None = None  # counted by the AdmissionGate: release at close


@dataclass
class WorkerIdentity:
    worker_id: int
    generation: int
    master_pid: int


class Worker:
    connection_class: type[Connection] = Connection  # the access log counts bytes in a subclass

    def __init__(self, config: Config, listeners: list[Listener], slot: WorkerSlot,
                 identity: WorkerIdentity, master_alive_fd: int, limits: SharedLimits) -> None:
        self.config = config
        self.listeners = {listener.fileno(): listener for listener in listeners}
        self.slot = slot
        self.identity = identity
        self.master_alive_fd = master_alive_fd
        self.epoll = select.epoll()
        self.connections: dict[int, Connection] = {}
        # (deadline, connection), in deadline order because idle_timeout is constant
        self.idle_queue: collections.deque[tuple[float, Connection]] = collections.deque()
        self.buffer = bytearray(min(READ_BUFFER_SIZE, config.max_buffer))
        self.view = memoryview(self.buffer)
        self.max_buffer = config.max_buffer
        self.accepting = False
        self.accept_resume_at = 0.0
        self.capacity_paused = False
        self.draining = False
        self.drain_deadline = 0.0
        self.stopping = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.accepted = 0
        self.counters = [0] * NUM_COUNTERS
        # None when no TCP limit is configured: the accept path then checks nothing
        self.admission = AdmissionGate(config, limits.connections, identity.worker_id - 1,
                                       self.counters) if tcp_limits_configured(config) else None
        self.max_lifetime = config.max_connection_lifetime
        # (deadline, connection) in accept order: the lifetime is the same for all
        self.lifetime_queue: collections.deque[tuple[float, Connection]] = collections.deque()
        self.datagram_echoes = self._datagram_echoes(limits)
        self.recycle_after = _recycle_threshold(config, identity.worker_id)
        self.heartbeat_interval = min(1.0, config.worker_timeout / 4)
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
        if os.environ.get(FAULT_INJECTION_ENV) == "boot":
            raise RuntimeError(f"boot failure injected by {FAULT_INJECTION_ENV}")
        self.signals = SignalQueue(WORKER_SIGNALS)
        # The master blocked signals around fork(); ours are installed now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        _enable_stack_dumps(self.config)
        self.epoll.register(self.signals.fileno(), EPOLLIN)
        self.epoll.register(self.master_alive_fd, EPOLLIN)
        if os.getppid() != self.identity.master_pid:
            log.warning("master died while this worker started; exiting")
            os._exit(exitcodes.OK)
        self._resume_accepting()
        now = time.monotonic()
        self.slot.set_state(State.READY)
        self.slot.heartbeat(now)
        log.debug("worker serving", extra={"fields": {"generation": self.identity.generation}})

    def _loop(self) -> None:
        poll = self.epoll.poll
        connections = self.connections
        listeners = self.listeners
        on_readable = self._on_readable
        on_writable = self._on_writable
        while not self.stopping:
            now = time.monotonic()
            if now >= self.next_housekeeping:
                self._housekeeping(now)
                now = time.monotonic()
            events = poll(max(0.0, self.next_housekeeping - now))
            now = time.monotonic()
            for fd, mask in events:
                conn = connections.get(fd)
                if conn is not None:
                    if mask & EPOLLOUT:
                        on_writable(conn, now)
                    if mask & (EPOLLIN | EPOLLERR):
                        if conn.reading:
                            on_readable(conn, now)
                        elif mask & EPOLLERR and connections.get(fd) is conn:
                            self._close(conn, Counter.CLOSED_RESET)
                elif fd in listeners:
                    listener = listeners[fd]
                    if listener.is_datagram:
                        self._on_datagram(listener)
                    else:
                        self._accept(listener, now)
                elif self.signals is not None and fd == self.signals.fileno():
                    self._on_signals()
                elif fd == self.master_alive_fd:
                    log.warning("master is gone; closing %d connection(s) and exiting",
                                len(connections))
                    self.stopping = True
            if self.draining and (not connections or now >= self.drain_deadline):
                if connections:
                    log.info("graceful timeout: closing %d connection(s)", len(connections))
                self.stopping = True

    def _housekeeping(self, now: float) -> None:
        self._expire_idle(now)
        if self.lifetime_queue:
            self._expire_lifetime(now)
        if not self.accepting and not self.draining and not self.capacity_paused \
                and now >= self.accept_resume_at:
            self._resume_accepting()
        self._publish(now)
        self.error_log.flush()
        next_tick = now + self.heartbeat_interval
        if self.idle_queue:
            next_tick = min(next_tick, self.idle_queue[0][0])
        if self.lifetime_queue:
            next_tick = min(next_tick, self.lifetime_queue[0][0])
        if not self.accepting and self.accept_resume_at > now:
            next_tick = min(next_tick, self.accept_resume_at)
        self.next_housekeeping = next_tick

    def _publish(self, now: float) -> None:
        counters = self.counters
        counters[Counter.ACCEPTED] = self.accepted
        counters[Counter.BYTES_IN] = self.bytes_in
        counters[Counter.BYTES_OUT] = self.bytes_out
        self.slot.publish(now, len(self.connections), counters)

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
            # HUP, TTIN, TTOU, USR2 are the master's business

    def _start_draining(self, why: str) -> None:
        if self.draining:
            return
        log.info("draining (%s): %d connection(s) open", why, len(self.connections))
        self.draining = True
        now = time.monotonic()
        self.drain_deadline = now + self.config.graceful_timeout
        self._pause_accepting()
        for listener in self.listeners.values():
            # EPOLLEXCLUSIVE may have woken only us for connections already queued:
            # take them before letting go, or they would wait for the next arrival.
            if not listener.is_datagram:
                self._accept_all_queued(listener, now)
            listener.close(unlink=False)  # our copy only: the master owns the socket
        self.listeners.clear()
        self.slot.set_state(State.DRAINING)
        self.next_housekeeping = 0.0

    def _request_recycling(self) -> None:
        """Ask the master for a replacement; it sends TERM once that one serves."""
        log.info("recycling after %d connections", self.accepted)
        self.slot.set_state(State.RETIRING)

    # -- accepting -----------------------------------------------------------------
    def _resume_accepting(self) -> None:
        for fd in self.listeners:
            # EPOLLEXCLUSIVE: one worker woken per connection, not all of them
            self.epoll.register(fd, EPOLLIN | select.EPOLLEXCLUSIVE)
        self.accepting = True
        self.capacity_paused = False

    def _pause_accepting(self) -> None:
        if self.accepting:
            for fd in self.listeners:
                self.epoll.unregister(fd)
            self.accepting = False

    def _accept(self, listener: Listener, now: float) -> None:
        sock = listener.sock
        connections = self.connections
        limit = self.config.max_connections
        tcp = sock.family != socket.AF_UNIX
        gate = self.admission if tcp else None
        for _ in range(ACCEPT_BATCH):
            if len(connections) >= limit:
                # leave further connections to workers with room
                self._pause_accepting()
                self.capacity_paused = True
                self.counters[Counter.REJECTED_MAX_CONNECTIONS] += 1
                return
            try:
                client, peer = sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    self.counters[ACCEPT_ERROR_COUNTERS.get(exc.errno, Counter.ACCEPT_OTHER)] += 1
                if exc.errno in FD_EXHAUSTED:
                    self._out_of_descriptors(exc, now)
                elif exc.errno not in ACCEPT_TRANSIENT:
                    self.counters[Counter.ERRORS] += 1
                    self.error_log.log(logging.WARNING, "accept on %s failed: %s",
                                       listener.bound, exc.strerror,
                                       key=f"accept {listener.bound} {exc.errno}")
                return
            ticket = None
            if gate is not None:
                ticket = gate.admit(peer[0])
                if ticket == REJECTED:
                    reject(client)
                    continue
            client.setblocking(False)
            if tcp:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self.connection_class(client, peer, now)
            conn.ticket = ticket
            connections[conn.fd] = conn
            self.epoll.register(conn.fd, EPOLLIN)
            if self.config.idle_timeout:
                self.idle_queue.append((now + self.config.idle_timeout, conn))
            if self.max_lifetime:
                self._track_lifetime(conn, now)
            self.accepted += 1
            if self.accepted == self.recycle_after:
                self._request_recycling()

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
        self.error_log.log(logging.WARNING, "out of file descriptors (%s) with %d connection(s) "
                           "open: pausing accept for %.1fs", exc.strerror, len(self.connections),
                           EMFILE_PAUSE, key="out of file descriptors")

    # -- echoing ---------------------------------------------------------------------
    def _on_readable(self, conn: Connection, now: float) -> None:
        pending = conn.pending
        room = self.max_buffer - len(pending)
        try:
            received = conn.sock.recv_into(self.buffer, min(room, len(self.buffer)))
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, Counter.CLOSED_RESET)
            return
        if not received:
            self._on_peer_eof(conn)
            return
        self.bytes_in += received
        conn.last_active = now
        if pending:
            # still flushing earlier bytes: queue behind them to keep order
            pending += self.view[:received]
            if len(pending) >= self.max_buffer:
                conn.reading = False
                self.epoll.modify(conn.fd, EPOLLOUT)
            return
        try:
            sent = conn.sock.send(self.view[:received])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn, Counter.CLOSED_RESET)
            return
        self.bytes_out += sent
        if sent < received:
            pending += self.view[sent:received]
            conn.reading = len(pending) < self.max_buffer
            self.epoll.modify(conn.fd, EPOLLOUT | EPOLLIN if conn.reading else EPOLLOUT)

    def _on_writable(self, conn: Connection, now: float) -> None:
        pending = conn.pending
        try:
            sent = conn.sock.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, Counter.CLOSED_RESET)
            return
        self.bytes_out += sent
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
        self.connections.pop(conn.fd, None)
        self.counters[reason] += 1
        try:
            self.epoll.unregister(conn.fd)
        except OSError:
            pass
        conn.sock.close()
        conn.pending = bytearray()
        conn.reading = False
        if conn.ticket is not None and self.admission is not None:
            self.admission.release(conn.ticket)
            conn.ticket = None
        if self.capacity_paused and len(self.connections) < self.config.max_connections \
                and not self.draining:
            self._resume_accepting()

    def _close_all(self, reason: Counter) -> None:
        for conn in list(self.connections.values()):
            _shutdown_gently(conn.sock)
            self._close(conn, reason)

    def _expire_idle(self, now: float) -> None:
        queue = self.idle_queue
        timeout = self.config.idle_timeout
        while queue and queue[0][0] <= now:
            _, conn = queue.popleft()
            if self.connections.get(conn.fd) is not conn:
                continue  # closed already (fds are reused, hence the identity check)
            deadline = conn.last_active + timeout
            if deadline <= now and not conn.pending:
                log.debug("closing idle connection from %s", conn.peer)
                self._close(conn, Counter.CLOSED_IDLE)
            else:
                queue.append((max(deadline, now + 0.001), conn))

    def _track_lifetime(self, conn: Connection, now: float) -> None:
        deadline = now + self.max_lifetime
        if not self.lifetime_queue:
            self.next_housekeeping = min(self.next_housekeeping, deadline)
        self.lifetime_queue.append((deadline, conn))

    def _expire_lifetime(self, now: float) -> None:
        queue = self.lifetime_queue
        while queue and queue[0][0] <= now:
            _, conn = queue.popleft()
            if self.connections.get(conn.fd) is conn:  # not closed (and fd reused) since
                log.debug("closing connection from %s: max_connection_lifetime", conn.peer)
                _shutdown_gently(conn.sock)
                self._close(conn, Counter.CLOSED_LIFETIME)

    # -- UDP -----------------------------------------------------------------------
    def _datagram_echoes(self, limits: SharedLimits) -> dict[int, DatagramEcho]:
        datagram_listeners = [lst for lst in self.listeners.values() if lst.is_datagram]
        if not datagram_listeners:
            return {}
        buffer = bytearray(DATAGRAM_BUFFER_SIZE)  # one for all: a worker reads one at a time
        check = build_source_check(self.config, limits.udp_buckets)
        return {lst.fileno(): DatagramEcho(lst.sock, self.config, check, buffer, self.counters)
                for lst in datagram_listeners}

    def _on_datagram(self, listener: Listener) -> None:
        self.datagram_echoes[listener.fileno()].on_readable()


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
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError:
        fds = logs.log_file_descriptors()
        target = fds[0] if fds else sys.stderr.fileno()
    try:
        faulthandler.enable(file=target, all_threads=True)
    except (OSError, ValueError, RuntimeError):
        pass


def start_worker(config: Config, listeners: list[Listener], slot: WorkerSlot,
                 identity: WorkerIdentity, master_alive_fd: int,
                 limits: SharedLimits) -> NoReturn:
    """Entry point in the freshly forked child."""
    logs.set_role(f"worker {identity.worker_id}")
    procname.set_title(f"worker {identity.worker_id} (generation {identity.generation})")
    procname.die_with_parent()
    worker_class = Worker
    if config.access_log:  # decided once: without an access log the hot path pays nothing
        from echod.access import AccessLoggingWorker

        worker_class = AccessLoggingWorker
    worker_class(config, listeners, slot, identity, master_alive_fd, limits).run()
