"""UDP echo (RFC 862) and the anti-reflection rules, against the real server."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import select
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.abuse import (
    counter,
    drain,
    nothing_waiting,
    udp_address,
    udp_socket,
    wait_counter,
)
from support.echod import free_port, ipv6_available
from support.paths import REPO

from echod.scoreboard import Counter
from echod.server.udp import is_unicast_source_v4, is_unicast_source_v6

SIZES = [1, 512, 1400, 8000, 65507]
NO_LIMITS = {"udp_rate_per_source": 0, "udp_rate_total": 0}


def roundtrip(
    sock: socket.socket, payload: bytes, server: tuple[str, int], timeout: float = 5.0
) -> tuple[bytes, tuple]:
    sock.settimeout(timeout)
    sock.sendto(payload, server)
    data, source = sock.recvfrom(70000)
    return data, source


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_datagrams_of_every_size_come_back_unchanged_from_the_bound_address(
    start_echod, ipv6: bool
) -> None:
    if ipv6 and not ipv6_available():
        pytest.skip("no IPv6 loopback")
    bind = "udp://[::1]:0" if ipv6 else "udp://127.0.0.1:0"
    server = start_echod(workers=2, bind=["127.0.0.1:0", bind])
    address = udp_address(server, ipv6)
    sizes = [*SIZES, 65527] if ipv6 else SIZES  # IPv6 carries 20 bytes more
    with udp_socket(("::1" if ipv6 else "127.0.0.1", 0)) as sock:
        for size in sizes:
            payload = os.urandom(size)
            data, source = roundtrip(sock, payload, address)
            assert data == payload, f"{size}-byte datagram came back altered"
            assert source[:2] == address  # from the address it was sent to


def test_tcp_and_udp_on_the_same_port(start_echod) -> None:
    for _ in range(20):  # a port free for both protocols
        port = free_port()
        try:
            with udp_socket(("127.0.0.1", port)):
                break
        except OSError:
            continue
    server = start_echod(bind=[f"127.0.0.1:{port}", f"udp://127.0.0.1:{port}"])
    assert server.port == port == udp_address(server)[1]
    with server.connect() as tcp, udp_socket() as udp:
        tcp.sendall(b"over tcp")
        assert tcp.recv(100) == b"over tcp"
        assert roundtrip(udp, b"over udp", ("127.0.0.1", port))[0] == b"over udp"


def _bind_privileged(port: int) -> socket.socket:
    if os.geteuid() != 0:
        pytest.skip(f"binding source port {port} needs root")
    try:
        return udp_socket(("127.0.0.1", port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            pytest.skip(f"127.0.0.1:{port}/udp is taken")
        raise


@pytest.mark.parametrize("port", [7, 19], ids=["echo", "chargen"])
def test_datagrams_from_reflector_ports_are_not_answered(start_echod, port: int) -> None:
    server = start_echod(bind=["127.0.0.1:0", "udp://127.0.0.1:0"], config=NO_LIMITS)
    address = udp_address(server)
    with _bind_privileged(port) as reflector, udp_socket() as client:
        reflector.sendto(b"loop me", address)
        # the server saw it and dropped it; a reply would have been sent by then
        wait_counter(server, Counter.UDP_DROPPED_PORT, 1)
        assert nothing_waiting(reflector)
        assert roundtrip(client, b"others still served", address)[0] == b"others still served"


def test_configured_source_port_is_dropped(start_echod) -> None:
    with udp_socket() as denied, udp_socket() as client:
        denied_port = denied.getsockname()[1]
        server = start_echod(
            bind=["127.0.0.1:0", "udp://127.0.0.1:0"],
            config={**NO_LIMITS, "udp_deny_source_ports": [denied_port]},
        )
        address = udp_address(server)
        denied.sendto(b"x", address)
        wait_counter(server, Counter.UDP_DROPPED_PORT, 1)
        assert nothing_waiting(denied)
        assert roundtrip(client, b"y", address)[0] == b"y"


def test_denied_source_addresses_are_dropped(start_echod) -> None:
    server = start_echod(
        bind=["127.0.0.1:0", "udp://127.0.0.1:0"], config={**NO_LIMITS, "deny": ["127.0.0.2"]}
    )
    address = udp_address(server)
    with udp_socket(("127.0.0.2", 0)) as denied, udp_socket() as client:
        denied.sendto(b"x", address)
        wait_counter(server, Counter.UDP_DROPPED_ADDRESS, 1)
        assert nothing_waiting(denied)
        assert roundtrip(client, b"y", address)[0] == b"y"


def _flood(
    sockets: list[socket.socket], address: tuple[str, int], duration: float, per_second: int
) -> tuple[list[int], list[int], float]:
    """Send from every socket at `per_second` each for `duration`; count replies."""
    sent = [0] * len(sockets)
    answered = [0] * len(sockets)
    started = time.monotonic()
    interval = 1.0 / per_second
    next_send = started
    while (now := time.monotonic()) - started < duration:
        if now >= next_send:
            for index, sock in enumerate(sockets):
                sock.sendto(b"flood", address)
                sent[index] += 1
            next_send += interval
        for index, sock in enumerate(sockets):
            answered[index] += drain(sock)
        select.select(sockets, [], [], max(0.0, next_send - time.monotonic()))
    return sent, answered, time.monotonic() - started


def _collect_rest(server, sockets: list[socket.socket], sent: int, answered: list[int]) -> None:
    # once the server has counted every datagram in, every reply is out already
    wait_counter(server, Counter.UDP_RECEIVED, sent)
    for index, sock in enumerate(sockets):
        answered[index] += drain(sock)


def test_a_flooding_source_is_capped_while_others_are_answered(start_echod, capsys) -> None:
    rate, burst = 50, 20
    server = start_echod(
        workers=2,
        bind=["127.0.0.1:0", "udp://127.0.0.1:0"],
        config={"udp_rate_per_source": rate, "udp_burst_per_source": burst, "udp_rate_total": 0},
    )
    address = udp_address(server)
    with udp_socket(("127.0.0.1", 0)) as flooder, udp_socket(("127.0.0.2", 0)) as bystander:
        sent, answered, elapsed = _flood([flooder], address, duration=1.5, per_second=1000)
        for index in range(5):  # the other source is answered in the middle of the flood
            payload = b"bystander %d" % index
            assert roundtrip(bystander, payload, address)[0] == payload
        _collect_rest(server, [flooder], sent[0] + 5, answered)
    expected = burst + rate * elapsed
    with capsys.disabled():
        print(
            f"\nper-source cap: sent {sent[0]} in {elapsed:.2f}s, answered {answered[0]}, "
            f"expected ~{expected:.0f} (burst {burst} + {rate}/s)"
        )
    assert burst <= answered[0] <= expected * 1.5 + 10, (sent, answered, expected)
    assert counter(server, Counter.UDP_DROPPED_RATE) >= sent[0] - answered[0] - 5


def test_the_global_cap_holds_across_sources_and_workers(start_echod, capsys) -> None:
    total = 60
    server = start_echod(
        workers=2,
        bind=["127.0.0.1:0", "udp://127.0.0.1:0"],
        config={"udp_rate_per_source": 0, "udp_rate_total": total},
    )
    address = udp_address(server)
    sources = [udp_socket((f"127.0.0.{index}", 0)) for index in (1, 2, 3)]
    try:
        sent, answered, elapsed = _flood(sources, address, duration=1.5, per_second=400)
        _collect_rest(server, sources, sum(sent), answered)
    finally:
        for sock in sources:
            sock.close()
    expected = total + total * elapsed  # a one-second burst, then the rate
    with capsys.disabled():
        print(
            f"\nglobal cap: sent {sum(sent)} from 3 sources in {elapsed:.2f}s, "
            f"answered {sum(answered)} {answered}, expected ~{expected:.0f} "
            f"({total} burst + {total}/s)"
        )
    assert total <= sum(answered) <= expected * 1.5 + 10, (sent, answered, expected)
    assert counter(server, Counter.UDP_DROPPED_RATE_TOTAL) > 0
    assert counter(server, Counter.UDP_DROPPED_RATE) == 0


def test_wildcard_bind_answers_from_the_address_each_datagram_arrived_on(tmp_path: Path) -> None:
    """Needs a host with several addresses: a private network namespace has only
    loopback, where 127.0.0.2 and 127.0.0.3 are addresses too. Without pktinfo the
    kernel would answer them from 127.0.0.1."""
    if os.geteuid() != 0:
        pytest.skip("a private network namespace needs root")
    script = tmp_path / "in_netns.py"
    script.write_text(
        textwrap.dedent(f"""
        import atexit, ctypes, fcntl, json, re, select, socket, struct, subprocess, sys, time
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000):  # CLONE_NEWNET
            print(json.dumps({{"skip": "unshare(CLONE_NEWNET) refused"}})); sys.exit()
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bring lo up
        flags = struct.unpack("16sh", fcntl.ioctl(probe, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(probe, 0x8914, struct.pack("16sh", b"lo", flags | 1))
        binds = ["-b", "udp://0.0.0.0:0"]
        try:
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).bind(("::1", 0))
            binds += ["-b", "udp://[::]:0"]
        except OSError:
            pass
        server = subprocess.Popen([sys.executable, "-m", "echod", "-F", "-w", "2",
                                   "--runtime-dir", {str(tmp_path / "run")!r}, *binds],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        atexit.register(server.kill)  # even when a step below fails: reap it by pid
        ports, deadline = {{}}, time.monotonic() + 15
        while time.monotonic() < deadline:
            if not select.select([server.stdout], [], [], 1)[0]:
                continue
            line = server.stdout.readline()
            if match := re.search(r"listening on udp://(\\[::\\]|0\\.0\\.0\\.0):(\\d+)", line):
                ports[match.group(1)] = int(match.group(2))
            if "ready" in line or not line:
                break
        results = []
        # several rounds sent at once, so that one batch holds datagrams to several
        # destinations ([::] is IPv6 only: V6ONLY)
        targets = [("127.0.0.1", "0.0.0.0"), ("127.0.0.2", "0.0.0.0"),
                   ("127.0.0.3", "0.0.0.0"), ("::1", "[::]")]
        for family in (socket.AF_INET, socket.AF_INET6):
            mine = [(destination, wildcard) for destination, wildcard in targets
                    if wildcard in ports and (":" in destination) == (family == socket.AF_INET6)]
            with socket.socket(family, socket.SOCK_DGRAM) as client:
                client.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
                client.settimeout(5)
                for round in range(4):
                    for destination, wildcard in mine:
                        label = f"{{destination}} {{wildcard}} {{round}}"
                        client.sendto(label.encode(), (destination, ports[wildcard]))
                for _ in range(4 * len(mine)):
                    data, source = client.recvfrom(100)
                    results.append([data.decode().split()[0], source[0], data.decode()])
        server.terminate()
        server.wait(10)
        print(json.dumps({{"results": results}}))
    """)
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    assert len(outcome["results"]) >= 12, outcome
    for destination, source, data in outcome["results"]:
        assert source == destination, f"sent {data!r} to {destination}, answered from {source}"
    sent = {f"{d} {w} {r}" for d, w in [("127.0.0.1", "0.0.0.0")] for r in range(4)}
    assert sent <= {data for _, _, data in outcome["results"]}


addresses_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
addresses_v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@given(addresses_v4)
def test_ipv4_source_filter_matches_the_definition(address: ipaddress.IPv4Address) -> None:
    never_unicast = (
        address in ipaddress.ip_network("0.0.0.0/8")
        or address.is_multicast
        or address in ipaddress.ip_network("240.0.0.0/4")
    )
    assert is_unicast_source_v4(str(address)) is not never_unicast


@given(
    st.one_of(
        addresses_v6,
        st.sampled_from(
            ["ff02::1", "ff::1", "ff0::1", "::", "::ffff:224.0.0.1", "::ffff:127.0.0.1"]
        ).map(ipaddress.IPv6Address),
    )
)
def test_ipv6_source_filter_matches_the_definition(address: ipaddress.IPv6Address) -> None:
    mapped = address.ipv4_mapped
    if mapped is not None:
        never_unicast = not is_unicast_source_v4(str(mapped))
    else:
        never_unicast = address.is_multicast or address.is_unspecified
    assert is_unicast_source_v6(str(address)) is not never_unicast
