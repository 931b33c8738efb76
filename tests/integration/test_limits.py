"""Behaviour under stress: backpressure, descriptor exhaustion, idle and connection limits."""

from __future__ import annotations

import socket
import time

import psutil
from support.echod import echo_roundtrip, wait_until


def _stuff(sockets: list[socket.socket], total: int, stall: float = 1.0) -> list[int]:
    """Send up to `total` bytes on each socket without reading; stop once the peer stops
    taking them (no progress on any socket for `stall` seconds)."""
    chunk = b"\xa5" * 65536
    sent = [0] * len(sockets)
    for sock in sockets:
        sock.setblocking(False)
    last_progress = time.monotonic()
    while time.monotonic() - last_progress < stall and min(sent) < total:
        progressed = False
        for index, sock in enumerate(sockets):
            if sent[index] >= total:
                continue
            try:
                sent[index] += sock.send(chunk[: total - sent[index]])
                progressed = True
            except BlockingIOError:
                pass
        if progressed:
            last_progress = time.monotonic()
        else:
            time.sleep(0.01)
    return sent


def test_clients_that_never_read_cost_bounded_memory(start_echod) -> None:
    max_buffer = 65536
    server = start_echod(workers=1, config={"max_buffer": max_buffer})
    (worker_pid,) = server.wait_workers(1)
    worker = psutil.Process(worker_pid)
    with server.connect() as warm:
        echo_roundtrip(warm, b"x" * 100_000)  # touch the read buffer before measuring
    rss_before = worker.memory_info().rss
    clients = [server.connect() for _ in range(20)]
    try:
        pushed = _stuff(clients, 16 << 20)
        # each client got stuck long before 16 MiB: the server stopped reading
        assert all(amount < 16 << 20 for amount in pushed), pushed
        growth = worker.memory_info().rss - rss_before
        # pending data is capped at max_buffer per connection; allow allocator slack
        assert growth < 20 * max_buffer + (24 << 20), f"worker RSS grew by {growth} bytes"
        # a stalled client never blocks another one
        with server.connect() as other:
            assert echo_roundtrip(other, b"still here") == b"still here"
    finally:
        for sock in clients:
            sock.close()


def test_out_of_descriptors_pauses_accept_without_spinning(start_echod) -> None:
    server = start_echod(workers=1, nofile=48)
    (worker_pid,) = server.wait_workers(1)
    worker = psutil.Process(worker_pid)
    clients = []
    try:
        for _ in range(60):  # more than the worker can hold; the rest wait in the backlog
            clients.append(socket.create_connection((server.host, server.port), timeout=5))
        server.wait_for_log("out of file descriptors")
        cpu_before = sum(worker.cpu_times()[:2])
        time.sleep(2.0)  # measuring an interval: a spinning worker would burn ~2 s of CPU
        cpu_used = sum(worker.cpu_times()[:2]) - cpu_before
        assert cpu_used < 0.5, f"worker used {cpu_used:.2f}s of CPU in 2s while out of fds"
        for sock in clients[:40]:
            sock.close()
        # the worker serves again, including connections that waited in the backlog
        for sock in clients[40:]:
            assert echo_roundtrip(sock, b"after emfile", timeout=15) == b"after emfile"
    finally:
        for sock in clients:
            sock.close()


def test_idle_connections_are_closed(start_echod) -> None:
    server = start_echod(config={"idle_timeout": 1})
    with server.connect() as idle, server.connect() as busy:
        started = time.monotonic()
        idle.settimeout(15)
        busy.settimeout(15)
        for _ in range(8):  # 2.4 s of activity keeps the busy one open
            assert echo_roundtrip(busy, b"tick") == b"tick"
            time.sleep(0.3)
        assert idle.recv(1) == b"", "idle connection was not closed"
        assert time.monotonic() - started >= 1.0
        assert echo_roundtrip(busy, b"tock") == b"tock"


def test_a_client_that_stops_reading_its_echo_is_idle_too(start_echod, tmp_path) -> None:
    """Bytes stuck in echod's queue are not activity: the connection and its buffer go."""
    access = tmp_path / "access.log"
    server = start_echod(config={"idle_timeout": 1, "access_log": str(access)})
    with server.connect() as stuck, server.connect() as busy:
        stall = 0.3
        sent = _stuff([stuck], 16 << 20, stall=stall)[0]  # fills socket buffers and echod's queue
        assert sent > 0
        last_byte_taken = time.monotonic() - stall  # echod read nothing after this
        busy.settimeout(15)

        def stuck_closed() -> bool:
            assert echo_roundtrip(busy, b"tick") == b"tick"  # the busy one stays open
            return access.exists() and "reason=idle_timeout" in access.read_text()

        wait_until(stuck_closed, timeout=20, interval=0.2, message="stuck connection closed")
        assert time.monotonic() - last_byte_taken >= 0.9
        line = next(x for x in access.read_text().splitlines() if "idle_timeout" in x)
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        # it was stuck: echod took bytes it could not hand back
        assert 0 < int(fields["bytes_out"]) < int(fields["bytes_in"]) <= sent


def test_idle_timeout_zero_never_closes(start_echod) -> None:
    server = start_echod(config={"idle_timeout": 0})
    with server.connect() as sock:
        sock.settimeout(1.5)
        try:
            data = sock.recv(1)
        except TimeoutError:
            data = None
        assert data is None
        assert echo_roundtrip(sock, b"alive") == b"alive"


def test_max_connections_per_worker(start_echod) -> None:
    server = start_echod(workers=1, config={"max_connections": 5})
    held = [server.connect() for _ in range(5)]
    try:
        for sock in held:
            assert echo_roundtrip(sock, b"in") == b"in"
        extra = server.connect()  # the kernel completes it; the worker does not accept
        extra.sendall(b"waiting")
        extra.settimeout(0.5)
        try:
            early = extra.recv(7)
        except TimeoutError:
            early = b""
        assert early == b"", "a worker at max_connections accepted another connection"
        held.pop().close()
        assert echo_roundtrip(extra, b"", timeout=10) == b""
        extra.settimeout(10)
        assert extra.recv(7) == b"waiting"
        held.append(extra)
    finally:
        for sock in held:
            sock.close()


def test_full_worker_leaves_connections_to_others(start_echod) -> None:
    server = start_echod(workers=2, config={"max_connections": 5})
    clients = []
    try:
        for index in range(10):
            sock = server.connect()
            clients.append(sock)
            assert echo_roundtrip(sock, f"c{index}".encode()) == f"c{index}".encode()
        per_worker = wait_until(
            lambda: _established_per_worker(server, 2), 10, message="connections on both workers"
        )
        assert per_worker == [5, 5]
    finally:
        for sock in clients:
            sock.close()


def _established_per_worker(server, expected_workers: int) -> list[int] | None:
    counts = []
    for pid in server.worker_pids():
        connections = psutil.Process(pid).net_connections(kind="tcp")
        counts.append(sum(1 for c in connections if c.status == psutil.CONN_ESTABLISHED))
    return sorted(counts) if len(counts) == expected_workers and sum(counts) == 10 else None
