"""The master's side of the ``/metrics`` endpoint: its socket and its process.

The master binds the socket before anything forks (so a port in use fails
start-up with exit 69, like any listener) and keeps it across reloads and
in-place upgrades; one child process serves it (``echod.metrics.service``).
That child is restarted if it dies (with back-off), restarted on a new socket
when a reload changes ``metrics_bind``, and never outlives the master. It runs
only while ``metrics_bind`` is set (``max_worker_memory`` is each worker's own
check, in ``echod.server.worker``).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field

from echod.addresses import parse_address
from echod.config import Config
from echod.errors import BindError
from echod.metrics.service import BACKLOG, run_metrics_process
from echod.scoreboard import Scoreboard
from echod.server.children import MASTER_SIGNALS, Children, RestartBackoff, describe_exit
from echod.server.listeners import Listener, adopt_sockets, open_listener

log = logging.getLogger("echod.metrics")


@dataclass
class MetricsService:
    """Owns the metrics socket in the master and keeps one metrics process serving it."""

    name = "metrics"  # its key in the upgrade hand-off (see children.Helper)
    bind: str = ""  # as configured; "" = off
    listener: Listener | None = None
    pid: int = 0
    started: float = 0.0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    replacing: bool = False  # we stopped the child ourselves (new socket): no back-off
    refused_bind: str = ""  # a reload asked for this and it could not be bound
    children: Children | None = None
    scoreboard: Scoreboard | None = None

    @classmethod
    def open(cls, bind: str) -> MetricsService:
        """Bind now (before any fork); BindError (exit 69) if the address is taken."""
        service = cls()
        if bind:
            service.listener = _open(bind)
            service.bind = bind
            _announce(service.listener)
        return service

    @classmethod
    def adopt(cls, fds: dict[str, int]) -> MetricsService:
        """In a re-executed master: the socket its previous image handed over, if any."""
        if not fds:
            return cls()
        ((bind, _),) = fds.items()  # the text as configured: compared with the config later
        ((address, sock),) = adopt_sockets(fds).items()
        return cls(bind=bind, listener=Listener(address, sock))

    # The master calls these (see children.Helper).
    def attach(self, children: Children, scoreboard: Scoreboard) -> None:
        self.children, self.scoreboard = children, scoreboard

    def sockets(self) -> list[Listener]:
        return [self.listener] if self.listener is not None else []

    def handoff_fds(self) -> dict[str, int]:
        return {self.bind: self.listener.fileno()} if self.listener is not None else {}

    def supervise(self, config: Config, stopping: bool, now: float) -> None:
        wanted = config.metrics_bind
        if wanted != self.bind and wanted != self.refused_bind:
            self._rebind(wanted)
        if stopping or self.listener is None or self.pid or not self.backoff.may_start(now):
            return
        self._spawn()

    def child_exited(self, pid: int, status: int) -> bool:
        if pid != self.pid:
            return False
        self.pid = 0
        if self.replacing:
            self.replacing = False
            return True
        now = time.monotonic()
        lived = now - self.started
        log.error(
            "metrics process (pid %d) %s after %.1fs; restarting it",
            pid,
            describe_exit(status),
            lived,
        )
        self.backoff.died(now, lived)
        return True

    def stop(self) -> None:
        """The master is leaving: stop the metrics process and close the socket."""
        self.before_exec()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def before_exec(self) -> None:
        """Stop the metrics process; an upgraded master starts its own on our socket."""
        if self.pid:
            assert self.children is not None
            self.children.stop_now(self.pid)
            self.pid = 0

    # -- inside --------------------------------------------------------------------------------
    def _rebind(self, wanted: str) -> None:
        """A reload changed metrics_bind: serve the new address, or keep the old one."""
        fresh: Listener | None = None
        if wanted:
            try:
                fresh = _open(wanted)
            except BindError as exc:
                log.error("reload: %s; metrics stay on %s", exc, self.bind or "(off)")
                self.refused_bind = wanted
                return
        self.refused_bind = ""
        if self.listener is not None:
            self.listener.close()
        self.listener, self.bind = fresh, wanted
        if fresh is not None:
            _announce(fresh)
        else:
            log.info("metrics endpoint turned off")
        self._replace_child()  # its successor serves the new socket

    def _replace_child(self) -> None:
        if self.pid and not self.replacing:
            assert self.children is not None
            self.replacing = True
            self.children.kill(self.pid, signal.SIGTERM)

    def _spawn(self) -> None:
        assert self.children is not None and self.children.inherited is not None
        assert self.scoreboard is not None and self.listener is not None
        listener, board, inherited = self.listener, self.scoreboard, self.children.inherited
        self.pid = self.children.fork(
            [listener],
            lambda: run_metrics_process(
                listener.sock,
                listener.bound,
                board,
                inherited.alive_read,
                inherited.master_pid,
                MASTER_SIGNALS,
            ),
            failed="metrics process failed",
            failure_code=1,
        )
        self.started = time.monotonic()
        log.debug("started metrics process (pid %d)", self.pid)


def _open(bind: str) -> Listener:
    return open_listener(parse_address(bind), BACKLOG)


def _announce(listener: Listener) -> None:
    log.info("serving metrics on http://%s/metrics", listener.bound)
