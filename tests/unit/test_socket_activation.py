"""listen_fds(): sockets handed over the way systemd does it, then by systemd-socket-activate."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

CHILD_TIMEOUT_SECONDS = 60.0

# Reports what listen_fds() found, as one JSON document on stdout. With "--serve" it
# also echoes one message on the first socket, proving the fd is the live socket.
CHECKER = r"""
import json, os, socket, sys
from echod.errors import EchodError
from echod.system.systemd import listen_fds
try:
    found = listen_fds()
except EchodError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
report = {
    "pid": os.getpid(),
    "sockets": [
        {
            "fd": s.fd, "name": s.name, "family": s.family.name, "type": s.type.name,
            "address": s.address if not isinstance(s.address, bytes) else None,
            "bind_spec": s.bind_spec, "listening": s.listening,
            "inheritable": os.get_inheritable(s.fd),
        }
        for s in found
    ],
    "environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
if "--serve" in sys.argv and found:
    sock = found[0].socket()
    if sock.type == socket.SOCK_STREAM:
        conn, _ = sock.accept()
        conn.sendall(conn.recv(100))
        conn.close()
    else:
        data, peer = sock.recvfrom(100)
        sock.sendto(data, peer)
"""

# Puts the given fds at 3, 4, ... with LISTEN_* set for its own pid, then execs the
# checker in the same pid: what systemd does between fork() and exec().
SHIM = r"""
import fcntl, os, sys
sources = [int(fd) for fd in sys.argv[1].split(",") if fd]
listen_pid = sys.argv[2]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]  # dodge overlaps
for target, fd in enumerate(high, start=3):
    os.dup2(fd, target)  # inheritable, as systemd passes them
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(sources))
os.environ["LISTEN_PID"] = str(os.getpid()) if listen_pid == "self" else listen_pid
if sys.argv[3] != "-":
    os.environ["LISTEN_FDNAMES"] = sys.argv[3]
os.execv(sys.executable, [sys.executable, "-c", sys.argv[4]])
"""


def run_activated(fds: Sequence[int], names: str | None, listen_pid: str = "self") -> Any:
    result = subprocess.run(
        [sys.executable, "-c", SHIM, ",".join(map(str, fds)), listen_pid, names or "-", CHECKER],
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[list[socket.socket]]:
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "echo.sock"))
    unix.listen()
    opened = [tcp, udp, unix]
    yield opened
    for sock in opened:
        sock.close()


def test_three_sockets_with_names(sockets: list[socket.socket], tmp_path: Path) -> None:
    tcp, udp, _unix = sockets
    report = run_activated([s.fileno() for s in sockets], "echo-tcp:echo-udp:echo-unix")
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    assert report["sockets"] == [
        {
            "fd": 3, "name": "echo-tcp", "family": "AF_INET", "type": "SOCK_STREAM",
            "address": ["127.0.0.1", tcp_port], "bind_spec": f"127.0.0.1:{tcp_port}",
            "listening": True, "inheritable": False,
        },
        {
            "fd": 4, "name": "echo-udp", "family": "AF_INET", "type": "SOCK_DGRAM",
            "address": ["127.0.0.1", udp_port], "bind_spec": f"udp://127.0.0.1:{udp_port}",
            "listening": False, "inheritable": False,
        },
        {
            "fd": 5, "name": "echo-unix", "family": "AF_UNIX", "type": "SOCK_STREAM",
            "address": str(tmp_path / "echo.sock"), "bind_spec": f"unix:{tmp_path}/echo.sock",
            "listening": True, "inheritable": False,
        },
    ]  # fmt: skip
    assert report["environ"] == []  # LISTEN_* unset after reading


def test_ipv6_bind_spec() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no ::1 here: {exc}")
    with server:
        port = server.getsockname()[1]
        report = run_activated([server.fileno()], None)
    assert [s["bind_spec"] for s in report["sockets"]] == [f"[::1]:{port}"]


def test_names_default_to_unknown_when_they_do_not_match(sockets: list[socket.socket]) -> None:
    report = run_activated([s.fileno() for s in sockets[:2]], "only-one")
    assert [s["name"] for s in report["sockets"]] == ["unknown", "unknown"]


def test_without_names(sockets: list[socket.socket]) -> None:
    report = run_activated([sockets[0].fileno()], None)
    assert [s["name"] for s in report["sockets"]] == ["unknown"]


def test_sockets_meant_for_another_pid_are_ignored(sockets: list[socket.socket]) -> None:
    report = run_activated([s.fileno() for s in sockets], "a:b:c", listen_pid="1")
    assert report["sockets"] == []
    assert report["environ"] == []  # unset anyway, like sd_listen_fds(1)


def test_no_environment_means_no_sockets() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [sys.executable, "-c", CHECKER],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=True,
    )
    assert json.loads(result.stdout)["sockets"] == []


def test_a_non_socket_fd_is_a_clear_error() -> None:
    read_end, write_end = os.pipe()
    try:
        report = run_activated([read_end], "pipe")
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "fd 3 (pipe) is not a usable socket" in report["error"]


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def exchange(kind: socket.SocketKind, port: int, deadline: float) -> bytes:
    """Send b"ping" to the activating listener (retrying until it listens), return the echo."""
    if kind == socket.SOCK_STREAM:
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=2.0)
                break
            except ConnectionRefusedError:  # systemd-socket-activate not listening yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with client:
            client.settimeout(CHILD_TIMEOUT_SECONDS)
            client.sendall(b"ping")
            return client.recv(100)
    # UDP: one client socket throughout, so the echo of whichever datagram arrived
    # first (earlier ones may predate the bind) comes back to it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.5)
        while True:
            client.sendto(b"ping", ("127.0.0.1", port))
            try:
                return client.recvfrom(100)[0]
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="no systemd")
@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_real_systemd_socket_activate(kind: socket.SocketKind) -> None:
    port = free_port(kind)
    datagram = ["--datagram"] if kind == socket.SOCK_DGRAM else []
    command = [
        "systemd-socket-activate", *datagram, f"--listen=127.0.0.1:{port}", "--fdname=echo",
        sys.executable, "-c", CHECKER, "--serve",
    ]  # fmt: skip
    activator = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert exchange(kind, port, time.monotonic() + 20) == b"ping"
        stdout, stderr = activator.communicate(timeout=CHILD_TIMEOUT_SECONDS)
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait(timeout=CHILD_TIMEOUT_SECONDS)
    assert activator.returncode == 0, stderr
    report = json.loads(stdout)
    expected_spec = f"udp://127.0.0.1:{port}" if datagram else f"127.0.0.1:{port}"
    assert [(s["fd"], s["name"], s["bind_spec"]) for s in report["sockets"]] == [
        (3, "echo", expected_spec)
    ]
    # systemd-socket-activate execs the command in its own pid, so LISTEN_PID matched.
    assert report["pid"] == activator.pid
