"""PROXY protocol v1 and v2 from proxy_protocol_from sources: the header is consumed,
never echoed; its client is the client for allow/deny, per-IP limits and the access
log; bad, late or abandoned headers are closed unanswered and counted. These tests
play the balancer from 127.0.0.1: the addresses in the headers are only strings
(192.0.2.0/24 and 2001:db8::/32 are documentation ranges; no traffic goes there)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
from support.abuse import connect_from, counter, is_served, wait_counter
from support.echod import (
    echo_roundtrip,
    ipv6_available,
    recv_exactly,
    recv_until_eof,
    wait_until,
)
from support.proxy_header import V2_SIGNATURE, tlv, v1_header, v2_header, v2_local

from echod.scoreboard import Counter

TRUSTED = {"proxy_protocol_from": ["127.0.0.1/32"]}


def access_lines(path: Path) -> list[dict[str, str]]:
    """The access log's fields, one dict per line (text format)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [
        dict(pair.split("=", 1) for pair in line.split(" access ", 1)[1].split(" "))
        for line in lines
        if " access " in line
    ]


def access_line_for(path: Path, peer: str) -> dict[str, str]:
    return wait_until(
        lambda: next((f for f in access_lines(path) if f["peer"] == peer), None),
        10,
        message=f"an access line for {peer}",
    )


def own_name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def echo_everything(sock: socket.socket, payload: bytes) -> bytes:
    """Send `payload` (from a thread: it may be more than the buffers hold), then
    half-close, and return everything echoed up to the server's close."""

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    echoed = recv_until_eof(sock, timeout=30)
    sender.join(30)
    return echoed


def trickle(sock: socket.socket, data: bytes) -> None:
    """One byte per segment (TCP_NODELAY, a pause between), as a slow balancer might."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for index in range(len(data)):
        sock.sendall(data[index : index + 1])
        time.sleep(0.002)


def served_after(sock: socket.socket, header: bytes) -> bool:
    """Send a header, then: does the server echo what follows?"""
    if sock.fileno() < 0:
        return False
    try:
        sock.sendall(header)
    except (ConnectionResetError, BrokenPipeError):
        return False
    return is_served(sock)


# Data that itself looks like headers: after the header it is only data.
TRICKY = b"PROXY TCP4 192.0.2.9 127.0.0.1 1 2\r\n" + V2_SIGNATURE + b"\x21\x11\x00\x0c"


@pytest.mark.parametrize(
    "header, carried",
    [
        (v1_header("192.0.2.7", 5555), "192.0.2.7:5555"),
        (v1_header("2001:db8::7", 5555, "::1"), "[2001:db8::7]:5555"),
        (v2_header("192.0.2.7", 5555), "192.0.2.7:5555"),
        (v2_header("2001:db8::7", 5555), "[2001:db8::7]:5555"),
        (
            v2_header("192.0.2.7", 5555, tlvs=tlv(0x01, b"h2") + tlv(0x05, os.urandom(128))),
            "192.0.2.7:5555",
        ),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6", "v2-tlvs"],
)
def test_the_header_is_consumed_and_the_rest_echoed_byte_exact(
    start_echod, tmp_path: Path, header: bytes, carried: str
) -> None:
    access = tmp_path / "access.log"
    # a small max_buffer: the bytes after the header go through backpressure too
    server = start_echod(config={**TRUSTED, "access_log": str(access), "max_buffer": 65536})
    payload = TRICKY + os.urandom(3 << 20) + TRICKY
    # the header and the data in one send
    with server.connect() as sock:
        assert echo_everything(sock, header + payload) == payload
    # the header alone, then the data
    with server.connect() as sock:
        sock.sendall(header)
        assert echo_roundtrip(sock, TRICKY) == TRICKY
        assert echo_everything(sock, payload) == payload
    # the header byte by byte, then the data
    with server.connect() as sock:
        trickle(sock, header)
        assert echo_everything(sock, payload) == payload
    lines = wait_until(
        lambda: (
            (found := [f for f in access_lines(access) if f["peer"] == carried])
            and len(found) == 3
            and found
        ),
        10,
        message=f"three access lines for {carried}",
    )
    for fields in lines:
        assert fields["reason"] == "client_eof"
        # the header is not data: only what followed it is counted
        assert int(fields["bytes_out"]) == int(fields["bytes_in"]) >= len(payload)
    assert wait_counter(server, Counter.PROXY_PROXIED, 3) == 3
    assert counter(server, Counter.PROXY_MALFORMED) == 0


def test_local_and_unknown_keep_the_real_peer(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = start_echod(config={**TRUSTED, "access_log": str(access)})
    peers = []
    for header in (v2_local(), b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 192.0.2.7 ::1 1 2\r\n"):
        with server.connect() as sock:
            sock.sendall(header)
            assert echo_roundtrip(sock, b"health") == b"health"
            peers.append(own_name(sock))
    for peer in peers:
        assert access_line_for(access, peer)["bytes_in"] == "6"
    assert wait_counter(server, Counter.PROXY_LOCAL, 3) == 3
    assert counter(server, Counter.PROXY_PROXIED) == 0


def test_deny_applies_to_the_carried_client_not_to_the_balancer(start_echod) -> None:
    # the balancer's own address is denied too: it is never the client, except LOCAL
    server = start_echod(config={**TRUSTED, "deny": ["192.0.2.0/24", "127.0.0.1/32"]})
    with server.connect() as sock:
        assert not served_after(sock, v2_header("192.0.2.7", 5555))
    with server.connect() as sock:
        assert not served_after(sock, v1_header("192.0.2.200", 1))
    with server.connect() as sock:
        assert served_after(sock, v2_header("198.51.100.1", 5555))
    with server.connect() as sock:
        assert served_after(sock, v1_header("2001:db8::1", 5555, "::1"))
    with server.connect() as sock:  # a health check is the balancer itself: denied
        assert not served_after(sock, v2_local())
    assert wait_counter(server, Counter.REJECTED_DENIED, 3) == 3


def test_the_access_log_names_a_refused_carried_client(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = start_echod(config={**TRUSTED, "deny": ["192.0.2.0/24"], "access_log": str(access)})
    with server.connect() as sock:
        assert not served_after(sock, v2_header("192.0.2.7", 5555))
    assert access_line_for(access, "192.0.2.7:5555")["reason"] == "rejected_denied"


def test_per_ip_limit_counts_carried_clients_not_the_balancer(start_echod) -> None:
    server = start_echod(workers=2, config={**TRUSTED, "max_connections_per_ip": 1})
    first = server.connect()
    second = server.connect()
    try:
        # two clients over the one balancer address: both served, at the same time
        assert served_after(first, v2_header("192.0.2.7", 1000))
        assert served_after(second, v1_header("192.0.2.8", 1000))
        with server.connect() as same:  # a second connection of 192.0.2.7: over its limit
            assert not served_after(same, v2_header("192.0.2.7", 1001))
        assert is_served(first) and is_served(second)
    finally:
        first.close()
        second.close()

    # its place is given back when it leaves
    def served_again() -> bool:
        with server.connect() as again:
            return served_after(again, v2_header("192.0.2.7", 1002))

    wait_until(served_again, 10, message="192.0.2.7 served again after its connection closed")
    assert wait_counter(server, Counter.REJECTED_PER_IP, 1) >= 1  # published within a second


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"PROXY TCP4 192.0.2.7 127.0.0.1 5555\r\nhello",
        b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 7\nhello",
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12) + b"hello",
    ],
    ids=["http", "v1-missing-port", "v1-bare-lf", "v2-version-3"],
)
def test_a_malformed_header_is_closed_with_nothing_echoed(
    start_echod, tmp_path: Path, garbage: bytes
) -> None:
    access = tmp_path / "access.log"
    server = start_echod(config={**TRUSTED, "access_log": str(access)})
    with server.connect() as sock:
        sock.sendall(garbage)
        try:
            assert recv_until_eof(sock) == b""
        except ConnectionResetError:
            pass  # closed with some of it unread: nothing was echoed either
        name = own_name(sock)
    assert wait_counter(server, Counter.PROXY_MALFORMED, 1) == 1
    assert access_line_for(access, name)["reason"] == "proxy_malformed"
    server.wait_for_log(r"closing connection from 127\.0\.0\.1:\d+: bad PROXY protocol header")
    with server.connect() as sock:  # the worker serves on
        assert served_after(sock, v1_header("192.0.2.7", 5555))


def test_a_header_not_complete_in_time_is_closed(start_echod) -> None:
    server = start_echod(config={**TRUSTED, "proxy_header_timeout": 0.5})
    started = time.monotonic()
    with server.connect() as silent, server.connect() as partial:
        partial.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1")
        for sock in (silent, partial):
            assert recv_until_eof(sock) == b""
    assert time.monotonic() - started >= 0.5  # not before the deadline
    assert wait_counter(server, Counter.PROXY_TIMEOUT, 2) == 2
    server.wait_for_log(r"no complete PROXY protocol header within proxy_header_timeout \(0.5s\)")


def test_an_idle_worker_rests_once_every_header_arrived(start_echod) -> None:
    # Each header that arrives in time leaves an emptied slot in the header wheel;
    # once its time had passed, the worker's housekeeping was due at every
    # iteration: an idle PROXY worker spun on epoll_wait(0) at 100 % CPU for good.
    server = start_echod(config={**TRUSTED, "proxy_header_timeout": 0.2})
    with server.connect() as sock:
        sock.sendall(v1_header("192.0.2.7", 5555) + b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    assert wait_counter(server, Counter.PROXY_PROXIED, 1) == 1
    (worker,) = (psutil.Process(pid) for pid in server.worker_pids())
    time.sleep(0.5)  # past the header's deadline: the slot it left is in the past
    before = sum(worker.cpu_times()[:2])
    time.sleep(1.0)  # the measured window: idle, so a few ticks of housekeeping at most
    used = sum(worker.cpu_times()[:2]) - before
    assert used < 0.3, f"an idle worker used {used:.2f} s of CPU in 1 s"


def test_a_balancer_that_leaves_mid_header_is_counted(start_echod) -> None:
    server = start_echod(config=TRUSTED)
    with server.connect():
        pass  # a plain TCP health check: connect and close
    with server.connect() as sock:
        sock.sendall(V2_SIGNATURE)
    assert wait_counter(server, Counter.PROXY_CLOSED_EARLY, 2) == 2
    assert counter(server, Counter.PROXY_MALFORMED) == 0


def test_other_sources_are_served_as_always_header_included(start_echod, tmp_path) -> None:
    path = tmp_path / "echo.sock"
    bind = ["127.0.0.1:0", f"unix:{path}"]
    v6 = ipv6_available()
    if v6:
        bind.append("[::1]:0")
    server = start_echod(bind=bind, config=TRUSTED)
    headers = v1_header("192.0.2.7", 5555) + v2_header("192.0.2.7", 5555) + v2_local()
    with connect_from(server, "127.0.0.2") as sock:  # not in the list: the header is data
        assert echo_roundtrip(sock, headers) == headers
    with socket.socket(socket.AF_UNIX) as sock:  # unix sockets: no balancer to trust there
        sock.settimeout(10)
        sock.connect(str(path))
        assert echo_roundtrip(sock, headers) == headers
    if v6:
        port = next(int(a.rsplit(":", 1)[1]) for a in server.addresses if a.startswith("[::1]"))
        with socket.create_connection(("::1", port), timeout=10) as sock:
            assert echo_roundtrip(sock, headers) == headers
    with server.connect() as sock:  # and the listed source still speaks PROXY
        sock.sendall(v2_header("192.0.2.7", 5555))
        assert echo_roundtrip(sock, headers) == headers
    assert wait_counter(server, Counter.PROXY_PROXIED, 1) == 1
    assert counter(server, Counter.PROXY_MALFORMED) == 0


def test_a_list_without_the_client_changes_nothing(start_echod) -> None:
    server = start_echod(config={"proxy_protocol_from": ["192.0.2.0/24"]})
    header = v1_header("192.0.2.7", 5555)
    with server.connect() as sock:
        assert echo_roundtrip(sock, header + b"data") == header + b"data"
    with server.connect() as sock:
        sock.sendall(v2_local())
        assert recv_exactly(sock, 16) == v2_local()
    for which in (Counter.PROXY_PROXIED, Counter.PROXY_LOCAL, Counter.PROXY_MALFORMED):
        assert counter(server, which) == 0
