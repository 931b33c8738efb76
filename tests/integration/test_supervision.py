"""The master's supervision: dead workers are replaced, workers die with the master,
and TERM / INT / QUIT stop it the way the SPEC says."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
from support.echod import (
    assert_closed_by_server,
    connection_refused,
    echo_roundtrip,
    wait_until,
)
from support.faults import BOOT_FAILURE, boot_fault_env


def _owners(server, clients: list[socket.socket]) -> dict[socket.socket, int] | None:
    """The worker pid holding the server side of each client connection."""
    by_port: dict[int, int] = {}
    for pid in server.worker_pids():
        for conn in psutil.Process(pid).net_connections(kind="tcp4"):
            if conn.raddr:
                by_port[conn.raddr.port] = pid
    owners = {sock: by_port.get(sock.getsockname()[1], 0) for sock in clients}
    return owners if all(owners.values()) else None


def test_killed_worker_is_replaced_and_others_are_unharmed(start_echod) -> None:
    # max_connections=5 with 10 clients puts exactly 5 on each worker
    server = start_echod(workers=2, config={"max_connections": 5})
    clients = [server.connect() for _ in range(10)]
    try:
        for sock in clients:
            assert echo_roundtrip(sock, b"before") == b"before"
        owners = wait_until(lambda: _owners(server, clients), 5, message="connection owners")
        victim = owners[clients[0]]
        killed_at = time.monotonic()
        psutil.Process(victim).kill()
        replacement = server.wait_workers(2, timeout=10, exclude={victim})
        replaced_in = time.monotonic() - killed_at
        assert victim not in replacement
        assert replaced_in < 3.0, f"replacement took {replaced_in:.2f}s"
        for sock, owner in owners.items():
            if owner == victim:
                assert_closed_by_server(sock)
            else:
                assert echo_roundtrip(sock, b"after") == b"after"
        assert sum(1 for o in owners.values() if o != victim) == 5
        server.wait_for_log(rf"worker \d+ \(pid {victim}\) was killed by SIGKILL")
        with server.connect() as fresh:
            assert echo_roundtrip(fresh, b"new") == b"new"
    finally:
        for sock in clients:
            sock.close()


def test_workers_die_with_a_killed_master_and_the_port_is_freed(start_echod) -> None:
    server = start_echod(workers=2)
    workers = [psutil.Process(pid) for pid in server.wait_workers(2)]
    port = server.port
    conversation = server.connect()
    assert echo_roundtrip(conversation, b"hi") == b"hi"
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers outlived the master: {[p.pid for p in alive]}"

    def bindable() -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    wait_until(bindable, 5, message="the port to be free")
    conversation.close()


def test_term_drains_live_conversations_and_refuses_new_ones(start_echod) -> None:
    server = start_echod(workers=2)
    conversation = server.connect()
    assert echo_roundtrip(conversation, b"one") == b"one"
    server.send_signal(signal.SIGTERM)

    wait_until(
        lambda: connection_refused(server.host, server.port),
        10,
        message="new connections to be refused",
    )
    for index in range(5):  # the open conversation keeps echoing while draining
        message = f"still talking {index}".encode()
        assert echo_roundtrip(conversation, message) == message
    assert server.proc.poll() is None, "master exited while a conversation was open"
    conversation.close()
    assert server.wait(15) == 0
    server.wait_for_log("echod stopped")


def test_graceful_timeout_bounds_the_drain(start_echod) -> None:
    server = start_echod(workers=1, config={"graceful_timeout": 1})
    conversation = server.connect()
    assert echo_roundtrip(conversation, b"x") == b"x"
    server.send_signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert_closed_by_server(conversation)
    conversation.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_fast_stop_closes_conversations(start_echod, signum: int) -> None:
    server = start_echod(workers=2)
    conversation = server.connect()
    assert echo_roundtrip(conversation, b"x") == b"x"
    server.send_signal(signum)
    assert server.wait(10) == 0
    assert_closed_by_server(conversation)
    conversation.close()


def test_ttin_and_ttou_change_the_worker_count(start_echod) -> None:
    server = start_echod(workers=2)
    server.wait_workers(2)
    server.send_signal(signal.SIGTTIN)
    server.wait_workers(3)
    # one at a time: the kernel merges a signal into one already pending
    server.send_signal(signal.SIGTTOU)
    server.wait_workers(2)
    server.send_signal(signal.SIGTTOU)
    server.wait_workers(1)
    server.send_signal(signal.SIGTTOU)  # never below one
    time.sleep(0.5)
    server.wait_workers(1)
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"one left") == b"one left"


def test_workers_that_cannot_boot_stop_the_master_instead_of_looping(
    start_echod, tmp_path: Path
) -> None:
    server = start_echod(workers=2, wait=False, env=boot_fault_env(tmp_path / "faults"))
    assert server.wait(20) == 1
    server.wait_for_log("cannot start")
    starts = server.output.count("started worker")
    assert starts <= 2, f"{starts} worker starts: a crash loop"
    # the worker's own reason reaches the operator
    server.wait_for_log("worker failed to start: " + re.escape(BOOT_FAILURE))


def test_a_worker_dying_young_repeatedly_is_restarted_with_back_off(start_echod) -> None:
    server = start_echod(workers=1)
    for _ in range(3):
        (pid,) = server.wait_workers(1)
        psutil.Process(pid).kill()
        wait_until(lambda p=pid: p not in server.worker_pids(), 10, message="worker death")
    server.wait_for_log(r"keeps dying young \(\d in a row\): next start in")
    server.wait_workers(1)
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"recovered") == b"recovered"
