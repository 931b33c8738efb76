"""Helpers for the UDP and admission tests: counters from the scoreboard, UDP
addresses from the log, and telling a served TCP connection from a refused one."""

from __future__ import annotations

import select
import socket

from echod.scoreboard import Counter, Scoreboard
from support.echod import EchodProcess, wait_until


def counter(server: EchodProcess, which: Counter) -> int:
    """Total of a counter over live and retired workers (published at least once a second)."""
    board = Scoreboard.attach(str(server.runtime_dir / "echod.scoreboard"), writable=False)
    try:
        return board.snapshot().totals()[which]
    finally:
        board.close()


def udp_kernel_drops(server: EchodProcess) -> int:
    """Datagrams the kernel dropped on the server's UDP sockets, as the scoreboard says."""
    board = Scoreboard.attach(str(server.runtime_dir / "echod.scoreboard"), writable=False)
    try:
        return board.snapshot().udp_receive_buffer_drops()
    finally:
        board.close()


def wait_counter(server: EchodProcess, which: Counter, at_least: int, timeout: float = 10.0) -> int:
    return wait_until(
        lambda: (value := counter(server, which)) >= at_least and value,
        timeout,
        message=f"{which.name} >= {at_least}",
    )


def udp_address(server: EchodProcess, ipv6: bool = False) -> tuple[str, int]:
    for address in server.addresses:
        if address.startswith("udp://"):
            host, _, port = address[len("udp://") :].rpartition(":")
            if (":" in host) == ipv6:
                return host.strip("[]"), int(port)
    raise AssertionError(f"no UDP {'IPv6' if ipv6 else 'IPv4'} listener logged")


def udp_socket(source: tuple[str, int] = ("127.0.0.1", 0)) -> socket.socket:
    family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(source)
    return sock


def drain(sock: socket.socket) -> int:
    """Datagrams waiting on `sock`, read without blocking."""
    count = 0
    while True:
        try:
            sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return count
        count += 1


def nothing_waiting(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0)[0]


def connect_from(
    server: EchodProcess, source: str = "127.0.0.1", timeout: float = 10.0
) -> socket.socket:
    """A connected socket. A refusal may come so fast (loopback, RST at accept) that it
    lands before connect() returns; the socket is then handed back closed."""
    sock = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    try:
        sock.connect((server.host, server.port))
    except ConnectionResetError:
        sock.close()
    return sock


def is_served(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True if the server echoes on `sock`; False if it closed or reset it."""
    if sock.fileno() < 0:
        return False  # reset during connect()
    sock.settimeout(timeout)
    try:
        sock.sendall(b"ping")
        received = b""
        while len(received) < 4:
            chunk = sock.recv(4 - len(received))
            if not chunk:
                return False
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return False
    assert received == b"ping"
    return True
