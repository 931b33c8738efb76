"""Faults from outside, against the real server: a hung worker holding conversations,
job-control signals sent to a worker, a log file that cannot be written, the runtime
directory deleted under a running master, and UDP traffic through reloads, upgrades
and worker kills. Each test proves echod keeps serving and says what happened."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.abuse import udp_address, udp_socket
from support.echod import (
    assert_closed_by_server,
    echo_roundtrip,
    free_port,
    run_echoctl,
    wait_until,
)

NO_UDP_LIMITS = {"udp_rate_per_source": 0, "udp_rate_total": 0}


def _owners(server, clients: list[socket.socket]) -> dict[socket.socket, int] | None:
    """The worker pid holding the server side of each client connection."""
    by_port: dict[int, int] = {}
    for pid in server.worker_pids():
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections(kind="tcp4"):
                if conn.raddr:
                    by_port[conn.raddr.port] = pid
    owners = {sock: by_port.get(sock.getsockname()[1], 0) for sock in clients}
    return owners if all(owners.values()) else None


def _split_clients(server, count: int) -> tuple[list[socket.socket], dict[socket.socket, int]]:
    clients = [server.connect() for _ in range(count)]
    for sock in clients:
        assert echo_roundtrip(sock, b"hello") == b"hello"
    owners = wait_until(lambda: _owners(server, clients), 5, message="connection owners")
    return clients, owners


# -- a hung worker -------------------------------------------------------------------
def test_a_hung_worker_holding_conversations_is_killed_and_replaced_and_its_peer_serves_on(
    start_echod,
) -> None:
    # max_connections=3 with 6 clients puts exactly 3 on each of the 2 workers
    server = start_echod(workers=2, config={"worker_timeout": 2, "max_connections": 3})
    clients, owners = _split_clients(server, 6)
    try:
        stuck = owners[clients[0]]
        (healthy,) = {pid for pid in owners.values() if pid != stuck}
        os.kill(stuck, signal.SIGSTOP)  # alive, holding its connections, silent
        stopped_at = time.monotonic()
        mark = server.mark()
        # while it hangs, the other worker's conversations go on
        index = 0
        while stuck in server.worker_pids() and time.monotonic() - stopped_at < 20:
            for sock, owner in owners.items():
                if owner == healthy:
                    message = f"during {index}".encode()
                    assert echo_roundtrip(sock, message) == message
            index += 1
            time.sleep(0.1)
        server.wait_for_log(
            rf"worker \d+ \(pid {stuck}\) silent for [\d.]+s \(worker_timeout 2s\)", start=mark
        )
        replacement = server.wait_workers(2, exclude={stuck}, timeout=15)
        hung_for = time.monotonic() - stopped_at
        assert healthy in replacement, "the healthy worker was killed with the hung one"
        assert hung_for < 15, f"the hung worker lived {hung_for:.1f}s with worker_timeout 2s"
        for sock, owner in owners.items():
            if owner == stuck:
                assert_closed_by_server(sock)
            else:
                assert echo_roundtrip(sock, b"after") == b"after"
        with server.connect() as fresh:
            assert echo_roundtrip(fresh, b"fresh") == b"fresh"
        # and longer than worker_timeout later, the healthy (now idle) worker is still there
        time.sleep(3)
        assert healthy in server.worker_pids()
        assert server.proc.poll() is None
    finally:
        for sock in clients:
            sock.close()


# -- job-control and master-only signals sent to a worker ------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTTOU, signal.SIGTTIN], ids=["TTOU", "TTIN"])
def test_a_scaling_signal_sent_to_a_worker_changes_nothing(start_echod, signum: int) -> None:
    server = start_echod(workers=2, config={"max_connections": 2})
    clients, owners = _split_clients(server, 4)
    try:
        target = owners[clients[0]]
        before = server.worker_pids()
        mark = server.mark()
        os.kill(target, signum)  # the default action of SIGTTOU/SIGTTIN is to stop
        deadline = time.monotonic() + 2.0  # a window to show a stop, a death or a rescale
        rounds = 0
        while time.monotonic() < deadline:
            for sock in clients:
                message = f"round {rounds}".encode()
                assert echo_roundtrip(sock, message, timeout=5) == message
            rounds += 1
            time.sleep(0.05)
        assert psutil.Process(target).status() != psutil.STATUS_STOPPED
        assert server.worker_pids() == before, "workers changed after a signal to one worker"
        assert server.proc.poll() is None
        tail = server.output.splitlines()[mark:]
        assert not [line for line in tail if "worker" in line and "started" in line], tail
    finally:
        for sock in clients:
            sock.close()


# -- the log file's disk fills up ---------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs to fill up (root only: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "tinyfs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


def test_a_full_log_disk_is_reported_once_echod_serves_on_and_usr1_recovers(
    start_echod, tiny_fs: Path
) -> None:
    log_file, access_file = tiny_fs / "echod.log", tiny_fs / "access.log"
    port = free_port()  # its "listening on" line goes to the log file, not to stdout
    server = start_echod(
        "--log-file",
        str(log_file),
        "--access-log",
        str(access_file),
        workers=1,
        wait=False,
        bind=[f"127.0.0.1:{port}"],
    )

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    wait_until(lambda: log_file.exists() and "ready" in log_file.read_text(), 15, message="ready")
    filler = _fill(tiny_fs)
    mark = server.mark()
    # every connection is an access-log line, and TTIN/TTOU are error-log lines
    for index in range(40):
        with connect() as sock:
            message = f"disk full {index}".encode()
            assert echo_roundtrip(sock, message) == message
    server.send_signal(signal.SIGTTIN)
    server.wait_workers(2)
    server.send_signal(signal.SIGUSR1)  # reopening while still full must not hurt either
    for _ in range(20):
        with connect() as sock:
            assert echo_roundtrip(sock, b"still full") == b"still full"
    assert server.proc.poll() is None
    complaints = wait_until(
        lambda: [line for line in server.output.splitlines()[mark:] if "cannot write" in line],
        10,
        message="a line saying the log cannot be written",
    )
    stderr_tail = server.output.splitlines()[mark:]
    assert "No space left on device" in complaints[0]
    assert str(tiny_fs) in complaints[0]
    assert not any("Traceback" in line or "Logging error" in line for line in stderr_tail), (
        "\n".join(stderr_tail[:40])
    )
    # once per process and file at most (master, 2 workers; error and access log)
    assert len(complaints) <= 6, "\n".join(complaints)
    assert len(stderr_tail) <= 12, "\n".join(stderr_tail[:40])

    logged = _access_lines(access_file)
    filler.unlink()
    server.send_signal(signal.SIGUSR1)
    wait_until(
        lambda: "reopening log files" in log_file.read_text(), 10, message="a log line after USR1"
    )
    with connect() as sock:
        assert echo_roundtrip(sock, b"recovered") == b"recovered"
    server.send_signal(signal.SIGTTOU)
    server.wait_workers(1)
    wait_until(
        lambda: _access_lines(access_file) > logged, 10, message="access lines after recovery"
    )
    assert server.proc.poll() is None
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0


def _access_lines(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines())


# -- the runtime directory disappears ---------------------------------------------------
def test_a_deleted_runtime_dir_is_explained_and_neither_stop_nor_the_next_start_suffer(
    start_echod, runtime_dir: Path
) -> None:
    server = start_echod(workers=2)
    assert run_echoctl("status", "--runtime-dir", str(runtime_dir)).returncode == 0
    shutil.rmtree(runtime_dir)
    for verb in (["status"], ["reload"], ["scale", "3"], ["stop"]):
        result = run_echoctl(*verb, "--runtime-dir", str(runtime_dir))
        assert result.returncode != 0, (verb, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(runtime_dir) in lines[0], (verb, result.stderr)
    # the master itself notices nothing: it serves and reloads
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"no rundir") == b"no rundir"
    old = set(server.wait_workers(2))
    server.send_signal(signal.SIGHUP)
    wait_until(
        lambda: len(server.worker_pids()) == 2 and not old & set(server.worker_pids()),
        20,
        message="a new generation without a runtime dir",
    )
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"reloaded") == b"reloaded"
    # an upgrade cannot hand the missing pidfile on: it is refused, nothing stops
    serving = server.worker_pids()
    mark = server.mark()
    server.send_signal(signal.SIGUSR2)
    server.wait_for_log(
        r"upgrade aborted, everything keeps running as it was: the pidfile .* was removed",
        start=mark,
    )
    assert server.proc.poll() is None and server.worker_pids() == serving
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"not upgraded") == b"not upgraded"
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert "Traceback" not in server.output, server.output
    # and the next start re-creates the directory, and echoctl finds it again
    second = start_echod(workers=1)
    assert (runtime_dir / "echod.pid").exists()
    status = run_echoctl("status", "--runtime-dir", str(runtime_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    assert str(second.pid) in status.stdout
    with second.connect() as sock:
        assert echo_roundtrip(sock, b"next start") == b"next start"


# -- UDP under chaos ----------------------------------------------------------------
class UdpFlow:
    """A background sender/receiver: numbered datagrams every few ms, and what came
    back from where."""

    def __init__(self, server_address: tuple[str, int]) -> None:
        self.server = server_address
        self.sock = udp_socket()
        self.sock.settimeout(0.005)  # ~100+ datagrams a second
        self.sent = 0
        self.answered = 0
        self.wrong_source: list[tuple[str, int]] = []
        self.wrong_payload = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UdpFlow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            payload = f"flow {self.sent}".encode()
            self.sent += 1
            with contextlib.suppress(OSError):
                self.sock.sendto(payload, self.server)
            with contextlib.suppress(OSError):
                while True:
                    data, source = self.sock.recvfrom(2048)
                    if source[:2] != self.server:
                        self.wrong_source.append(source[:2])
                    elif not data.startswith(b"flow "):
                        self.wrong_payload += 1
                    else:
                        self.answered += 1


def _answered_within(sock: socket.socket, server: tuple[str, int], timeout: float) -> float:
    """Seconds until a fresh probe is answered (from the right address), or fail."""
    start = time.monotonic()
    seq = 0
    while time.monotonic() - start < timeout:
        payload = f"probe {seq} {os.urandom(4).hex()}".encode()
        seq += 1
        sock.sendto(payload, server)
        sock.settimeout(0.1)
        try:
            while True:
                data, source = sock.recvfrom(2048)
                assert source[:2] == server, f"answered from {source}, sent to {server}"
                if data == payload:
                    return time.monotonic() - start
        except TimeoutError:
            continue
    raise AssertionError(f"no UDP answer within {timeout}s")


def test_udp_answers_resume_after_reload_upgrade_and_a_killed_worker(start_echod) -> None:
    server = start_echod(workers=2, bind=["127.0.0.1:0", "udp://127.0.0.1:0"], config=NO_UDP_LIMITS)
    address = udp_address(server)
    resumed: dict[str, float] = {}
    with UdpFlow(address) as flow, udp_socket() as probe:
        assert _answered_within(probe, address, 5) < 5
        wait_until(lambda: flow.answered > 20, 10, message="the flow to be answered")
        for action in ("HUP", "USR2", "KILL", "HUP", "USR2", "KILL"):
            old = set(server.worker_pids())
            if action == "KILL":
                os.kill(sorted(old)[0], signal.SIGKILL)
            else:
                server.send_signal(getattr(signal, f"SIG{action}"))
            resumed[action] = max(resumed.get(action, 0.0), _answered_within(probe, address, 5))
            if action != "KILL":  # the new generation serves before the next action
                wait_until(
                    lambda o=old: len(set(server.worker_pids()) - o) == 2,
                    20,
                    message=f"new workers after {action}",
                )
            else:
                server.wait_workers(2, timeout=10)
            answered = flow.answered
            wait_until(lambda a=answered: flow.answered > a + 10, 5, message="the flow to go on")
        sent, answered = flow.sent, flow.answered
        wrong_source, wrong_payload = list(flow.wrong_source), flow.wrong_payload
    print(f"UDP chaos: resumed within {resumed}; flow sent {sent}, answered {answered}")
    assert server.proc.poll() is None
    assert not wrong_source, f"replies from {set(wrong_source)}, expected only {address}"
    assert wrong_payload == 0
    assert answered > sent * 0.5, (sent, answered)
