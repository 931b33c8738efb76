"""The two UDP read paths of DatagramEcho, in process on real loopback sockets.

A socket bound to one address is answered with recvfrom_into/sendto and its
kernel drop count read by SO_MEMINFO at housekeeping; where SO_MEMINFO is
missing, with recvmsg_into and SO_RXQ_OVFL's control message. Both echo every
datagram byte for byte, and check 2 (unicast sources) is remembered per host.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from echod.config import Config
from echod.scoreboard import NUM_COUNTERS, Counter
from echod.server import udp
from echod.server.udp import BUFFER_SIZE, DatagramEcho


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def echo_of(sock: socket.socket) -> tuple[DatagramEcho, list[int]]:
    counters = [0] * NUM_COUNTERS
    return DatagramEcho(sock, Config(), None, bytearray(BUFFER_SIZE), counters), counters


def exchange(echo: DatagramEcho, server: socket.socket, payloads: list[bytes]) -> list[bytes]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.connect(server.getsockname())
        for payload in payloads:
            client.send(payload)
        echo.on_readable()
        return [client.recv(BUFFER_SIZE) for _ in payloads]


def test_a_socket_bound_to_one_address_takes_the_plain_path(server: socket.socket) -> None:
    echo, counters = echo_of(server)
    assert echo.drops_by_meminfo
    assert echo.on_readable == echo._answer
    payloads = [b"x", bytes(range(256)) * 4, b"\0" * 1400]
    assert exchange(echo, server, payloads) == payloads
    assert counters[Counter.UDP_RECEIVED] == counters[Counter.UDP_SENT] == 3
    assert echo.unicast == {"127.0.0.1": True}
    echo.refresh_drops()
    assert echo.kernel_drops == 0


def test_without_so_meminfo_the_drop_count_comes_with_the_datagrams(
    server: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp, "read_kernel_drops", lambda sock: None)
    echo, counters = echo_of(server)
    assert not echo.drops_by_meminfo
    assert echo.on_readable == echo._answer_with_ancillary
    assert server.getsockopt(socket.SOL_SOCKET, udp.SO_RXQ_OVFL) == 1
    payloads = [b"y" * 100, b"z"]
    assert exchange(echo, server, payloads) == payloads
    assert counters[Counter.UDP_SENT] == 2
    echo.refresh_drops()  # nothing to read: the count stays as the datagrams left it
    assert echo.kernel_drops == 0


def test_the_unicast_verdicts_are_bounded(server: socket.socket) -> None:
    echo, _ = echo_of(server)
    for index in range(udp.UNICAST_CACHE + 5):
        assert echo._is_unicast(f"10.0.{index // 256}.{index % 256}")
    assert len(echo.unicast) <= udp.UNICAST_CACHE
    assert not echo._is_unicast("224.0.0.1")
