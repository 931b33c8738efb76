"""Byte-exact echo over TCP, unix and IPv6 listeners, for any payload and chunking."""

from __future__ import annotations

import os
import random
import selectors
import signal
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.echod import echo_roundtrip, ipv6_available, recv_exactly, recv_until_eof

FIXTURE_CHECK = HealthCheck.function_scoped_fixture  # the shared server is module-scoped


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the many small cases (hypothesis runs hundreds of examples)."""
    from support.echod import EchodProcess, child_env, echod_command

    run = tmp_path_factory.mktemp("run")
    argv = [*echod_command(), "-F", "-w", "2", "-b", "127.0.0.1:0", "--runtime-dir", str(run)]
    process = EchodProcess(argv, child_env(), run)
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


def _send_and_collect(sock: socket.socket, payload: bytes, chunks: list[int]) -> bytes:
    """Write in the given chunk sizes while reading concurrently (no deadlock on big data)."""
    received = bytearray()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            received.extend(recv_exactly(sock, len(payload), timeout=30))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    offset = 0
    for size in chunks:
        sock.sendall(payload[offset : offset + size])
        offset += size
    sock.sendall(payload[offset:])
    thread.join(60)
    assert not thread.is_alive(), "reader did not finish"
    if errors:
        raise errors[0]
    return bytes(received)


@pytest.mark.parametrize("size", [0, 1, 2, 1000, 65535, 65536, 65537, 1 << 20, 8 << 20])
def test_random_binary_payload_is_echoed_exactly(shared_server, size: int) -> None:
    payload = random.Random(size).randbytes(size)
    with shared_server.connect() as sock:
        echoed = _send_and_collect(sock, payload, [])
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""  # nothing extra, then a clean close
    assert echoed == payload


def test_nul_and_all_byte_values(shared_server) -> None:
    payload = bytes(range(256)) * 64 + b"\0" * 1000
    with shared_server.connect() as sock:
        assert echo_roundtrip(sock, payload) == payload


@settings(max_examples=60, deadline=None, suppress_health_check=[FIXTURE_CHECK])
@given(
    payload=st.binary(min_size=1, max_size=50_000),
    cuts=st.lists(st.integers(min_value=1, max_value=7000), max_size=20),
)
def test_any_chunking_is_echoed_exactly(shared_server, payload: bytes, cuts: list[int]) -> None:
    with shared_server.connect() as sock:
        assert _send_and_collect(sock, payload, cuts) == payload


@settings(max_examples=30, deadline=None, suppress_health_check=[FIXTURE_CHECK])
@given(messages=st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=50))
def test_pipelined_requests_come_back_in_order(shared_server, messages: list[bytes]) -> None:
    with shared_server.connect() as sock:
        for message in messages:
            sock.sendall(message)  # all written before any read
        assert recv_exactly(sock, sum(map(len, messages))) == b"".join(messages)


def test_300_concurrent_connections_on_one_worker(start_echod) -> None:
    server = start_echod(workers=1)
    selector = selectors.DefaultSelector()
    clients = []
    try:
        for index in range(300):
            sock = server.connect()
            sock.setblocking(False)
            clients.append(sock)
            selector.register(sock, selectors.EVENT_READ, index)
        expected = {i: f"client {i} says hello\n".encode() * 3 for i in range(300)}
        for index, sock in enumerate(clients):
            sock.send(expected[index])
        received = {i: b"" for i in range(300)}
        done = 0
        for _ in range(10_000):
            if done == 300:
                break
            events = selector.select(timeout=10)
            assert events, "server stopped answering"
            for key, _ in events:
                chunk = key.fileobj.recv(65536)
                assert chunk, f"client {key.data} closed early"
                received[key.data] += chunk
                if len(received[key.data]) == len(expected[key.data]):
                    selector.unregister(key.fileobj)
                    done += 1
        assert received == expected
        assert len(server.worker_pids()) == 1
    finally:
        for sock in clients:
            sock.close()
        selector.close()


def test_half_close_flushes_more_than_the_socket_buffers_hold(start_echod) -> None:
    """Send 4 MiB without reading, shut down writing, then read: all must come back."""
    server = start_echod(workers=1, config={"max_buffer": 8 << 20})
    payload = os.urandom(4 << 20)
    with server.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer = threading.Thread(
            target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR))
        )
        writer.start()
        # let the server accumulate pending data it cannot send yet
        writer.join(2)
        echoed = recv_until_eof(sock, timeout=30)
        writer.join(30)
    assert echoed == payload


def test_unix_socket_listener(start_echod, tmp_path) -> None:
    path = tmp_path / "echo.sock"
    server = start_echod(bind=[f"unix:{path}"])
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        payload = os.urandom(200_000)
        assert _send_and_collect(sock, payload, [1, 2, 3, 4096]) == payload
    server.send_signal(15)
    assert server.wait() == 0
    assert not path.exists(), "the socket file is removed on a clean stop"


def test_stale_unix_socket_file_is_replaced(start_echod, tmp_path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    start_echod(bind=[f"unix:{path}"])
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        assert echo_roundtrip(sock, b"ping") == b"ping"


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_ipv6_listener(start_echod) -> None:
    server = start_echod(bind=["[::1]:0"])
    assert server.addresses[0].startswith("[::1]:")
    with socket.create_connection(("::1", server.port), timeout=10) as sock:
        assert echo_roundtrip(sock, b"over ipv6") == b"over ipv6"


def test_what_clients_sent_before_being_accepted_is_echoed_exactly(start_echod) -> None:
    """The worker reads a connection right after accepting it (the client has
    usually sent by then): data, a half-close and more than the socket buffers
    hold, all queued before the accept, come back byte for byte."""
    server = start_echod(workers=1)
    (worker,) = server.worker_pids()
    payloads = [os.urandom(size) for size in (1, 64, 1000, 65536, 4 << 20)]
    socks = []
    os.kill(worker, signal.SIGSTOP)
    try:
        for index, payload in enumerate(payloads):
            sock = server.connect()
            socks.append(sock)
            if len(payload) <= 65536:
                sock.sendall(payload)
                if index % 2 == 0:
                    sock.shutdown(socket.SHUT_WR)
    finally:
        os.kill(worker, signal.SIGCONT)
    try:
        big, big_sock = payloads[-1], socks[-1]
        writer = threading.Thread(
            target=lambda: (big_sock.sendall(big), big_sock.shutdown(socket.SHUT_WR))
        )
        writer.start()
        for index, (payload, sock) in enumerate(zip(payloads, socks, strict=True)):
            if sock is big_sock:
                assert recv_until_eof(sock, timeout=30) == payload
            elif index % 2 == 0:
                assert recv_until_eof(sock, timeout=10) == payload
            else:
                assert recv_exactly(sock, len(payload), timeout=10) == payload
        writer.join(30)
        assert not writer.is_alive()
    finally:
        for sock in socks:
            sock.close()


def test_defer_accept_serves_clients_that_send_late(start_echod) -> None:
    """With TCP_DEFER_ACCEPT the kernel holds a connection until its first byte:
    one that sends at once and one that sends after a pause are both echoed."""
    server = start_echod(workers=1, config={"defer_accept": 5})
    with server.connect() as early, server.connect() as late:
        assert echo_roundtrip(early, b"at once") == b"at once"
        time.sleep(0.3)  # the kernel still holds `late`: nothing sent yet
        assert echo_roundtrip(late, b"after a pause") == b"after a pause"
