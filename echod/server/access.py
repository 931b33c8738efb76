"""The access log: one line per finished TCP/unix connection.

Chosen once per worker at start (``start_worker``): with ``access_log`` off the
plain :class:`~echod.server.worker.Worker` runs and pays nothing; with it on, this
subclass logs in ``_close``, through which every connection leaves, from the
byte counts every :class:`~echod.server.worker.Connection` keeps.
"""

from __future__ import annotations

import socket
import time

from echod.addresses import format_host_port
from echod.logs import access_log
from echod.scoreboard import Counter
from echod.server.worker import Connection, Worker

# Why a connection ended: the access log's `reason` and the metrics' `reason` label.
CLOSE_REASONS: dict[Counter, str] = {
    Counter.CLOSED_EOF: "client_eof",
    Counter.CLOSED_IDLE: "idle_timeout",
    Counter.CLOSED_RESET: "reset",
    Counter.CLOSED_LIFETIME: "lifetime_limit",
    Counter.CLOSED_SHUTDOWN: "shutdown",
}


class AccessLoggingWorker(Worker):
    def _close(self, conn: Connection, reason: Counter) -> None:
        if self.connections.get(conn.fd) is not conn:
            return  # closed already
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
