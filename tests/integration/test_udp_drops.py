"""Datagrams the kernel drops (receive buffer full) are counted, and the
``udp_receive_buffer`` key sizes the buffer: against the real server, on loopback.

Each burst is sent while the only worker is stopped (SIGSTOP), so that nothing
reads the socket: what the buffer holds is answered after SIGCONT, the rest is
dropped by the kernel and counted: echod reads the socket's drop count
(SO_MEMINFO) at each housekeeping tick, or, on kernels without it, from the
next datagram the socket queues (SO_RXQ_OVFL); a probe datagram serves both.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.abuse import udp_address, udp_kernel_drops, udp_socket
from support.echod import EchodProcess, run_echoctl, status_json, wait_until

from echod.config import DEFAULT_UDP_RECEIVE_BUFFER

NO_LIMITS = {"udp_rate_per_source": 0, "udp_rate_total": 0}
PAYLOAD = b"d" * 1400
RMEM_MAX = int(Path("/proc/sys/net/core/rmem_max").read_text())


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def client() -> socket.socket:
    sock = udp_socket()
    # room for every answer of a burst (capped by rmem_max like the server's)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    return sock


def burst(server: EchodProcess, count: int) -> int:
    """Send `count` datagrams while the worker is stopped; how many come back."""
    (worker,) = server.worker_pids()
    address = udp_address(server)
    with client() as sock:
        with stopped(worker):
            for _ in range(count):
                sock.sendto(PAYLOAD, address)
        return answers(sock)


def answers(sock: socket.socket, quiet: float = 1.0) -> int:
    sock.settimeout(quiet)
    count = 0
    try:
        while True:
            assert sock.recv(65536) == PAYLOAD
            count += 1
    except TimeoutError:
        return count


def probe(server: EchodProcess) -> None:
    """One datagram after a burst: without SO_MEMINFO, the drop count comes with it."""
    with udp_socket() as sock:
        sock.settimeout(5)
        sock.sendto(b"probe", udp_address(server))
        assert sock.recv(100) == b"probe"


def status_drops(server: EchodProcess) -> int:
    return int(status_json(server.runtime_dir)["totals"]["udp_dropped_receive_buffer"])


def metric_drops(address: str) -> int:
    from test_metrics import scrape, value  # the metrics tests' parser

    return int(value(scrape(address), "echod_udp_receive_buffer_drops_total"))


def settle(read, at_least: int, timeout: float = 10.0) -> int:
    return wait_until(
        lambda: (value := read()) >= at_least and value,
        timeout,
        message=f"kernel drops >= {at_least}",
    )


def test_a_burst_onto_a_stopped_worker_is_counted_and_the_count_never_goes_back(
    start_echod,
) -> None:
    config = {"udp_receive_buffer": 65536, "metrics_bind": "127.0.0.1:0", **NO_LIMITS}
    server = start_echod(workers=1, bind=["127.0.0.1:0", "udp://127.0.0.1:0"], config=config)
    endpoint = server.wait_for_log(r"serving metrics on http://(\S+)/metrics").group(1)
    assert udp_kernel_drops(server) == 0
    assert metric_drops(endpoint) == 0

    answered = burst(server, 300)
    lost = 300 - answered
    assert 0 < answered < 300, "64 KiB cannot hold 300 datagrams of 1400 bytes"
    probe(server)
    drops = settle(lambda: udp_kernel_drops(server), lost)
    assert drops == lost  # the client's buffer held every answer: the rest died in ours
    assert status_drops(server) == drops
    assert settle(lambda: metric_drops(endpoint), drops) == drops

    # the socket outlives workers: after a reload (old worker folded in), the same count
    (old,) = server.worker_pids()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(rf"\(pid {old}\) exited", timeout=30)
    server.wait_workers(1, exclude={old})
    history = [drops]
    for _ in range(5):
        history.append(udp_kernel_drops(server))
        time.sleep(0.1)
    assert history == sorted(history), history

    answered = burst(server, 300)
    probe(server)
    total = settle(lambda: udp_kernel_drops(server), drops + 300 - answered)
    assert total == drops + 300 - answered
    assert settle(lambda: metric_drops(endpoint), total) == total

    # and after an in-place upgrade (new master image, same socket, same scoreboard)
    (old,) = server.worker_pids()
    mark = server.mark()
    server.send_signal(signal.SIGUSR2)
    server.wait_for_log("upgraded in place", timeout=30, start=mark)
    server.wait_for_log(rf"\(pid {old}\) exited", timeout=30, start=mark)
    server.wait_workers(1, exclude={old})
    assert udp_kernel_drops(server) == total
    answered = burst(server, 300)
    probe(server)
    final = settle(lambda: udp_kernel_drops(server), total + 300 - answered)
    assert final == total + 300 - answered
    assert settle(lambda: metric_drops(endpoint), final) == final
    assert status_drops(server) == final
    shown = run_echoctl("status", "--runtime-dir", server.runtime_dir)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"; {final} dropped by the kernel (receive buffer full)" in text, text


def test_the_default_buffer_absorbs_a_burst_of_300_datagrams_where_the_host_allows(
    start_echod,
) -> None:
    server = start_echod(workers=1, bind=["127.0.0.1:0", "udp://127.0.0.1:0"], config=NO_LIMITS)
    answered = burst(server, 300)
    probe(server)
    if RMEM_MAX >= DEFAULT_UDP_RECEIVE_BUFFER:
        assert answered == 300
        assert "capped by the kernel" not in server.output
        assert udp_kernel_drops(server) == 0
    else:  # the host caps it: said once at start, and every loss is counted
        server.wait_for_log(
            rf"udp_receive_buffer {DEFAULT_UDP_RECEIVE_BUFFER} capped by the kernel at"
            rf" {RMEM_MAX} bytes \(net.core.rmem_max\)"
        )
        assert settle(lambda: udp_kernel_drops(server), 300 - answered) == 300 - answered


def test_asking_more_than_rmem_max_says_so_once_naming_the_sysctl(start_echod) -> None:
    asked = min(2 * RMEM_MAX + 4096, 1 << 30)
    server = start_echod(
        workers=2,
        bind=["udp://127.0.0.1:0", "udp://127.0.0.1:0", "127.0.0.1:0"],
        config={"udp_receive_buffer": asked},
    )
    line = (
        rf"WARNING.*udp_receive_buffer {asked} capped by the kernel at {RMEM_MAX} bytes"
        r" \(net.core.rmem_max\)"
    )
    server.wait_for_log(line)
    time.sleep(0.5)
    assert server.output.count("capped by the kernel") == 1, server.output


def test_udp_receive_buffer_from_the_environment_sizes_the_socket(start_echod) -> None:
    server = start_echod(
        workers=1,
        bind=["127.0.0.1:0", "udp://127.0.0.1:0"],
        env={"ECHOD_UDP_RECEIVE_BUFFER": "65536"},
        config=NO_LIMITS,
    )
    answered = burst(server, 300)
    assert answered < 300  # 64 KiB is far too small for the burst


def test_drops_are_counted_on_a_wildcard_socket_too(start_echod) -> None:
    """A wildcard socket reads PKTINFO as well: the drop count comes beside it."""
    server = start_echod(
        workers=1,
        bind=["127.0.0.1:0", "udp://0.0.0.0:0"],
        config={"udp_receive_buffer": 65536, **NO_LIMITS},
    )
    answered = burst(server, 300)
    assert 0 < answered < 300
    probe(server)
    assert settle(lambda: udp_kernel_drops(server), 300 - answered) == 300 - answered
