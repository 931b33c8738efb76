"""The two UDP read paths of DatagramEcho, in process on real loopback sockets.

A socket bound to one address is answered in batches (recvmmsg/sendmmsg) and
its kernel drop count read by SO_MEMINFO at housekeeping; where SO_MEMINFO or
the batch calls are missing, one datagram at a time with recvmsg_into (and
SO_RXQ_OVFL's control message). Both echo every datagram byte for byte, drop
what the checks refuse from the middle of a batch, and remember check 2
(unicast sources) per host.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import pytest

from echod.config import Config
from echod.scoreboard import NUM_COUNTERS, Counter
from echod.server import mmsg, udp
from echod.server.udp import BUFFER_SIZE, DatagramEcho, SourceCheck

CALLS = mmsg.load()


def bound(family: socket.AddressFamily, host: str) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # 64 large datagrams
    sock.bind((host, 0))
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def server() -> Iterator[socket.socket]:
    yield from bound(socket.AF_INET, "127.0.0.1")


@pytest.fixture
def server6() -> Iterator[socket.socket]:
    yield from bound(socket.AF_INET6, "::1")


def echo_of(
    sock: socket.socket, check: SourceCheck | None = None, config: Config | None = None
) -> tuple[DatagramEcho, list[int]]:
    """The echo a worker would make for ``sock`` (udp.datagram_echoes), and its counters."""
    counters = [0] * NUM_COUNTERS
    echo = udp.datagram_echoes([sock], config or Config(), check, counters)[sock.fileno()]
    return echo, counters


def client_of(server: socket.socket) -> socket.socket:
    client = socket.socket(server.family, socket.SOCK_DGRAM)
    client.settimeout(5)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    client.connect(server.getsockname()[:2])
    return client


def exchange(echo: DatagramEcho, server: socket.socket, payloads: list[bytes]) -> list[bytes]:
    with client_of(server) as client:
        for payload in payloads:
            client.send(payload)
        for _ in range(len(payloads) // udp.BATCH + 1):
            echo.on_readable()
        return [client.recv(BUFFER_SIZE) for _ in payloads]


def test_a_socket_bound_to_one_address_answers_in_batches(server: socket.socket) -> None:
    echo, counters = echo_of(server)
    assert echo.drops_by_meminfo
    assert echo.on_readable == echo._answer_batch
    # more than a batch, the largest datagram, an empty one: byte for byte, in order
    payloads = [b"x", bytes(range(256)) * 4, b"\0" * 1400, b"", b"y" * 65507]
    payloads += [b"%d" % index for index in range(100)]
    assert exchange(echo, server, payloads) == payloads
    assert counters[Counter.UDP_RECEIVED] == counters[Counter.UDP_SENT] == len(payloads)
    total = sum(map(len, payloads))
    assert counters[Counter.UDP_BYTES_IN] == counters[Counter.UDP_BYTES_OUT] == total
    assert set(echo.hosts.values()) == {"127.0.0.1"}
    echo.refresh_drops()
    assert echo.kernel_drops == 0


def test_ipv6_batches_name_their_sources_as_recvfrom_would(server6: socket.socket) -> None:
    echo, counters = echo_of(server6)
    payloads = [b"six" * index for index in range(70)]
    assert exchange(echo, server6, payloads) == payloads
    assert counters[Counter.UDP_SENT] == 70
    assert set(echo.hosts.values()) == {"::1"}
    loopback_index = socket.if_nametoindex("lo")
    link_local = socket.inet_pton(socket.AF_INET6, "fe80::1")
    scoped = link_local + loopback_index.to_bytes(4, sys.byteorder)
    assert echo._learn(scoped, udp._host_of(scoped)) == "fe80::1%lo"
    multicast = socket.inet_pton(socket.AF_INET6, "ff02::1") + bytes(4)
    assert echo._learn(multicast, udp._host_of(multicast)) == ""
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:224.0.0.1") + bytes(4)
    assert echo._learn(mapped, udp._host_of(mapped)) == ""


def test_refused_datagrams_leave_the_middle_of_a_batch(server: socket.socket) -> None:
    """A check that refuses every third datagram: the others are answered, in order."""

    def every_third(host: str, now: float) -> int:
        nonlocal seen
        seen += 1
        return udp._DROPPED_RATE if seen % 3 == 0 else 0

    seen = 0
    echo, counters = echo_of(server, every_third)
    payloads = [b"%03d" % index for index in range(60)]
    with client_of(server) as client:
        for payload in payloads:
            client.send(payload)
        echo.on_readable()
        answered = [payload for index, payload in enumerate(payloads) if (index + 1) % 3]
        assert [client.recv(100) for _ in answered] == answered
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(100)  # nothing more: the refused ones were not sent
    assert counters[Counter.UDP_DROPPED_RATE] == 20
    assert counters[Counter.UDP_SENT] == 40
    assert counters[Counter.UDP_BYTES_OUT] == 40 * 3
    # the reply vector points at its own slots again for the next batch
    assert exchange(echo, server, [b"next", b"batch"]) == [b"next", b"batch"]


def test_a_denied_source_port_is_dropped_from_a_batch(server: socket.socket) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as denied:
        denied.bind(("127.0.0.1", 0))
        port = denied.getsockname()[1]
        echo, counters = echo_of(server, config=Config(udp_deny_source_ports=(port,)))
        denied.sendto(b"loop?", server.getsockname())
        assert exchange(echo, server, [b"fine"]) == [b"fine"]
        denied.setblocking(False)
        with pytest.raises(BlockingIOError):
            denied.recv(100)
    assert counters[Counter.UDP_DROPPED_PORT] == 1


def test_a_reply_the_kernel_refuses_is_counted_and_skipped(
    server: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert CALLS is not None
    echo, counters = echo_of(server)
    assert echo.batch is not None
    real = CALLS.sendmmsg
    calls = 0

    def refuse_first(fd: int, vector: int, count: int, flags: int) -> int:
        nonlocal calls
        calls += 1
        return -1 if calls == 1 else real(fd, vector, count, flags)

    monkeypatch.setattr(echo.batch, "calls", mmsg._Calls(CALLS.recvmmsg, refuse_first))
    payloads = [b"first", b"second", b"third"]
    with client_of(server) as client:
        for payload in payloads:
            client.send(payload)
        echo.on_readable()
        assert [client.recv(100), client.recv(100)] == payloads[1:]
    assert counters[Counter.ERRORS] == 1
    assert counters[Counter.UDP_SENT] == 2
    assert counters[Counter.UDP_BYTES_OUT] == len(b"secondthird")


def test_without_the_batch_calls_a_bound_socket_reads_one_at_a_time(
    server: socket.socket,
) -> None:
    counters = [0] * NUM_COUNTERS
    echo = DatagramEcho(server, Config(), None, bytearray(BUFFER_SIZE), counters, None)
    assert echo.on_readable == echo._answer_with_ancillary
    payloads = [b"one", b"two"]
    assert exchange(echo, server, payloads) == payloads
    assert counters[Counter.UDP_SENT] == 2


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
        host = f"10.0.{index // 256}.{index % 256}"
        assert echo._learn(host, host)
    assert len(echo.hosts) <= udp.UNICAST_CACHE
    assert not echo._learn("224.0.0.1", "224.0.0.1")


def test_replies_name_each_datagrams_destination_batch_after_batch(
    server: socket.socket,
) -> None:
    """The pktinfo batch (a wildcard socket's; tests/integration/test_udp.py runs one
    in a network namespace): datagrams that carry no pktinfo (the option not set
    yet) are answered anyway; every later batch gets its control messages back."""
    assert CALLS is not None
    batch = mmsg.DatagramBatch(CALLS, BUFFER_SIZE, socket.AF_INET, pktinfo=True)
    with client_of(server) as client:
        for round in range(3):
            if round == 1:
                server.setsockopt(socket.IPPROTO_IP, mmsg.IP_PKTINFO, 1)
            payloads = [b"%d-%d" % (round, index) for index in range(5)]
            for payload in payloads:
                client.send(payload)
            count = batch.receive(server.fileno())
            assert count == len(payloads)
            lengths = batch.lengths(count)
            received = batch._received_bytes[: count * mmsg._MMSG_SIZE]
            controls = [length for (length,) in mmsg._CONTROL_LENGTHS.iter_unpack(received)]
            assert controls == [batch.control_size if round else 0] * count
            batch.reply_from_destination(count)
            for slot, length in enumerate(lengths):
                batch.reply_lengths[2 * slot + 1] = length
            assert batch.send(server.fileno(), 0, count) == []
            assert [client.recv(100) for _ in payloads] == payloads
