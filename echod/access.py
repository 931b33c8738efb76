"""The access log: one line per finished TCP/unix connection.

Chosen once per worker at start (``start_worker``): with ``access_log`` off the
plain :class:`~echod.worker.Worker` runs and pays nothing; with it on, this
subclass counts bytes per connection by diffing the worker's running totals
around each read/write handler (one extra call per event, no copy of the hot
path), and logs in ``_close``, through which every connection leaves.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from echod.addresses import format_host_port
from echod.logs import access_log
from echod.scoreboard import Counter
from echod.worker import Connection, Worker

# Why a connection ended: the access log's `reason` and the metrics' `reason` label.
CLOSE_REASONS: dict[Counter, str] = {
    Counter.CLOSED_EOF: "client_eof",
    Counter.CLOSED_IDLE: "idle_timeout",
    Counter.CLOSED_RESET: "reset",
    Counter.CLOSED_LIFETIME: "lifetime_limit",
    Counter.CLOSED_SHUTDOWN: "shutdown",
}


class CountedConnection(Connection):
    __slots__ = ("bytes_in", "bytes_out")

    def __init__(self, sock: socket.socket, peer: object, now: float) -> None:
        super().__init__(sock, peer, now)
        self.bytes_in = 0
        self.bytes_out = 0


class AccessLoggingWorker(Worker):
    connection_class = CountedConnection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the connection whose handler is running, and the worker totals before it ran
        self._serving: CountedConnection | None = None
        self._in_before = 0
        self._out_before = 0

    def _on_readable(self, conn: Connection, now: float) -> None:  # type: ignore[override]
        self._begin(conn)  # type: ignore[arg-type]
        super()._on_readable(conn, now)
        self._settle(conn)  # type: ignore[arg-type]

    def _on_writable(self, conn: Connection, now: float) -> None:  # type: ignore[override]
        self._begin(conn)  # type: ignore[arg-type]
        super()._on_writable(conn, now)
        self._settle(conn)  # type: ignore[arg-type]

    def _begin(self, conn: CountedConnection) -> None:
        self._serving = conn
        self._in_before = self.bytes_in
        self._out_before = self.bytes_out

    def _settle(self, conn: CountedConnection) -> None:
        if self._serving is conn:
            conn.bytes_in += self.bytes_in - self._in_before
            conn.bytes_out += self.bytes_out - self._out_before
            self._serving = None

    def _close(self, conn: Connection, reason: Counter) -> None:  # type: ignore[override]
        if self.connections.get(conn.fd) is not conn:
            super()._close(conn, reason)
            return
        assert isinstance(conn, CountedConnection)
        self._settle(conn)  # a handler may close mid-way: count what it moved so far
        # Logged before the socket closes: once the client sees the close, its line exists.
        access_log.info("access", extra={"fields": {
            "peer": format_peer(conn.peer),
            "local": _local_address(conn.sock),
            "duration": round(time.monotonic() - conn.accepted_at, 6),
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "reason": CLOSE_REASONS.get(reason, reason.name.lower()),
        }})
        super()._close(conn, reason)


def format_peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return format_host_port(str(address[0]), int(address[1]))
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    return f"unix:{address}" if address else "unix"


def _local_address(sock: socket.socket) -> str:
    try:
        return format_peer(sock.getsockname())
    except OSError:
        return "?"
