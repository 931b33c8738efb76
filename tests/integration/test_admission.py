"""TCP admission control: allow/deny lists, per-client and total connection limits
held across workers (also when a worker dies), and max_connection_lifetime."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import time

import psutil
import pytest
from support.abuse import connect_from, is_served, wait_counter
from support.echod import child_env, echod_command, ipv6_available, wait_until

from echod.scoreboard import Counter


def test_deny_list_refuses_at_once_and_others_are_served(start_echod) -> None:
    server = start_echod(config={"deny": ["127.0.0.2/32", "::1"]})
    with connect_from(server, "127.0.0.2") as denied, connect_from(server) as allowed:
        assert not is_served(denied)
        assert is_served(allowed)
    assert wait_counter(server, Counter.REJECTED_DENIED, 1) == 1


def test_lists_apply_to_ipv6_clients(start_echod) -> None:
    if not ipv6_available():
        pytest.skip("no IPv6 loopback")
    server = start_echod(bind=["[::1]:0"], config={"deny": ["::1/128"]})
    with connect_from(server, "::1") as denied:
        assert not is_served(denied)
    assert wait_counter(server, Counter.REJECTED_DENIED, 1) == 1


def test_allow_list_admits_only_the_listed(start_echod) -> None:
    server = start_echod(config={"allow": ["127.0.0.1"]})
    with connect_from(server, "127.0.0.2") as stranger, connect_from(server) as listed:
        assert not is_served(stranger)
        assert is_served(listed)


def test_deny_wins_over_allow(start_echod) -> None:
    server = start_echod(config={"allow": ["127.0.0.0/8"], "deny": ["127.0.0.2"]})
    with connect_from(server, "127.0.0.2") as denied, connect_from(server, "127.0.0.3") as ok:
        assert not is_served(denied)
        assert is_served(ok)


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("allow", '["127.0.0.1/33"]', "allow: '127.0.0.1/33' is not an address or network"),
        ("deny", '["127.0.0.1/8"]', "deny: '127.0.0.1/8' has host bits set"),
        ("udp_deny_source_ports", '[7, "x"]', "udp_deny_source_ports must be a list of integers"),
        ("max_connections_per_ip", "-1", "max_connections_per_ip: must be between 0 and 65535"),
    ],
)
def test_bad_admission_config_names_the_key(tmp_path, key: str, value: str, problem: str) -> None:
    path = tmp_path / "echod.toml"
    path.write_text(f"{key} = {value}\n")
    done = subprocess.run(
        [*echod_command(), "-t", "-c", str(path)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 78
    assert problem in done.stderr


def _open(server, count: int, source: str = "127.0.0.1") -> tuple[list, list]:
    """Open `count` connections at once, then sort them into served and refused."""
    sockets = [connect_from(server, source) for _ in range(count)]
    served, refused = [], []
    for sock in sockets:
        (served if is_served(sock) else refused).append(sock)
    for sock in refused:
        sock.close()
    return served, refused


def _one_more(server, source: str = "127.0.0.1") -> socket.socket | None:
    """A new connection if the server serves it, else None (to poll with wait_until)."""
    sock = connect_from(server, source)
    if is_served(sock):
        return sock
    sock.close()
    return None


def _holders(server, sockets: list[socket.socket]) -> dict[int, int]:
    """worker pid -> how many of `sockets` it serves."""
    ports = {sock.getsockname()[1] for sock in sockets}
    held = {}
    for pid in server.worker_pids():
        with_us = [
            c
            for c in psutil.Process(pid).net_connections("tcp")
            if c.raddr and c.raddr.port in ports
        ]
        if with_us:
            held[pid] = len(with_us)
    return held


def test_per_ip_limit_is_exact_across_workers_and_survives_a_killed_worker(start_echod) -> None:
    limit, extra = 4, 3
    server = start_echod(workers=3, config={"max_connections_per_ip": limit})
    server.wait_workers(3)
    served, refused = _open(server, limit + extra)
    assert (len(served), len(refused)) == (limit, extra)
    # another address has its own allowance
    other, _ = _open(server, 1, source="127.0.0.2")
    assert len(other) == 1

    # closing some makes room again, exactly as much
    for sock in served[:2]:
        sock.close()
    served = served[2:] + [
        wait_until(lambda: _one_more(server), message="a freed place") for _ in range(2)
    ]
    with connect_from(server) as over:
        assert not is_served(over)

    # a worker killed with its connections: the master gives their places back
    held = _holders(server, served)
    victim = max(held, key=held.__getitem__)
    lost = held[victim]
    survivors = [
        sock
        for sock in served
        if sock.getsockname()[1]
        not in {c.raddr.port for c in psutil.Process(victim).net_connections("tcp") if c.raddr}
    ]
    psutil.Process(victim).send_signal(signal.SIGKILL)
    server.wait_workers(3, exclude={victim})
    regained = [
        wait_until(lambda: _one_more(server), message="places of the dead worker")
        for _ in range(lost)
    ]
    with connect_from(server) as over:
        assert not is_served(over)
    assert all(is_served(sock) for sock in survivors)
    wait_counter(server, Counter.REJECTED_PER_IP, 1)  # a killed worker takes its unpublished counts
    for sock in served + regained + other:
        sock.close()


def test_total_limit_is_exact_across_workers(start_echod) -> None:
    total = 3
    server = start_echod(workers=2, config={"max_connections_total": total})
    server.wait_workers(2)
    first, _ = _open(server, 2, "127.0.0.1")
    second, _ = _open(server, 3, "127.0.0.2")
    assert len(first) + len(second) == total
    wait_counter(server, Counter.REJECTED_TOTAL, 2)
    first[0].close()
    assert wait_until(lambda: _one_more(server, "127.0.0.3"), message="a freed place")


def test_connections_are_closed_after_their_lifetime_even_when_busy(start_echod) -> None:
    lifetime = 1.0
    server = start_echod(config={"max_connection_lifetime": lifetime, "idle_timeout": 0})
    sock = connect_from(server)
    opened = time.monotonic()
    deadline = opened + 15
    closed = False
    while not closed and time.monotonic() < deadline:
        try:
            sock.sendall(b"still busy")
            # wait for the echo, or the server's FIN/RST, whichever comes first
            select.select([sock], [], [], 5)
            closed = sock.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        if not closed:
            select.select([sock], [], [], 0.05)  # pace the pings; wakes early on close
    sock.close()
    assert closed, "the connection outlived max_connection_lifetime"
    assert time.monotonic() - opened >= lifetime - 0.05
    wait_counter(server, Counter.CLOSED_LIFETIME, 1)
