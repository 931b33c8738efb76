"""The access log: one line per finished TCP/unix connection.

A close hook, not part of the worker: the worker calls it for each connection
just before closing it, and only a worker started with ``access_log`` on is
given one (see ``start_worker``), so without an access log the worker pays
nothing. The line is written before the socket closes: once the client sees
the close, its line exists. Everything in it comes from the byte counts and
times each connection keeps anyway.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Protocol

from echod.addresses import format_host_port
from echod.config import Config
from echod.logs import access_log
from echod.scoreboard import CLOSE_REASONS, Counter


class ClosingConnection(Protocol):
    """What the hook reads of a worker's connection (echod.server.worker.Connection)."""

    peer: object
    sock: socket.socket
    accepted_at: float
    bytes_in: int
    bytes_out: int


def close_hook(config: Config) -> Callable[[ClosingConnection, Counter], None] | None:
    """The hook a worker should call as each connection closes, or None for none."""
    return log_close if config.access_log else None


def log_close(conn: ClosingConnection, reason: Counter) -> None:
    access_log.info(
        "access",
        extra={
            "fields": {
                "peer": format_peer(conn.peer),
                "local": _local_address(conn.sock),
                "duration": round(time.monotonic() - conn.accepted_at, 6),
                "bytes_in": conn.bytes_in,
                "bytes_out": conn.bytes_out,
                "reason": CLOSE_REASONS.get(reason, reason.name.lower()),
            }
        },
    )


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
