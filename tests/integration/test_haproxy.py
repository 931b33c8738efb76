"""Two echod behind a real HAProxy (Debian's haproxy, the shipped etc/haproxy/echod.cfg),
health-checked on /readyz: a rolling restart and a USR2 upgrade of both fail no client.

HAProxy runs on loopback ports with the shipped file's variables set, and is stopped
by pid. It must be installed (.ci/run installs it): missing, these tests fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.echod import (
    EchodProcess,
    child_env,
    echod_command,
    free_port,
    run_echoctl,
    status_json,
    wait_until,
)
from support.load import ClientLoad
from support.paths import ETC

HAPROXY_CONFIG = ETC / "haproxy" / "echod.cfg"
UP = "2"  # srv_op_state in `show servers state`: SRV_ST_RUNNING
# > inter x fall (2 x 500 ms) of the shipped config (tests/unit/test_shipped_examples.py)
SHUTDOWN_DELAY = 2.0


@dataclass
class Backend:
    """One echod instance on fixed ports, so that it can be started again on them."""

    name: str
    port: int
    health_port: int
    runtime_dir: Path
    config_path: Path
    process: EchodProcess | None = None

    def start(self) -> EchodProcess:
        argv = [*echod_command(), "-F", "--runtime-dir", str(self.runtime_dir)]
        argv += ["-c", str(self.config_path), "-w", "2"]
        self.process = EchodProcess(argv, child_env(), self.runtime_dir)
        self.process.wait_ready()
        return self.process


class HAProxy:
    def __init__(self, tmp_path: Path, backends: list[Backend]) -> None:
        self.port = free_port()
        self.stats = tmp_path / "haproxy.sock"
        env = {
            **os.environ,
            "ECHO_LB_BIND": f"127.0.0.1:{self.port}",
            "ECHO_LB_STATS": str(self.stats),
        }
        for number, backend in enumerate(backends, 1):
            env[f"ECHO_BACKEND{number}"] = f"127.0.0.1:{backend.port}"
            env[f"ECHO_BACKEND{number}_HEALTH"] = str(backend.health_port)
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        assert os.path.exists(binary), "haproxy is not installed (.ci/run installs it)"
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(HAPROXY_CONFIG)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self.stats.exists, 15, message="haproxy's stats socket")

    def command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Server name -> operational state, from the runtime API."""
        states = {}
        for line in self.command("show servers state echod").splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[0].isdigit():
                states[fields[3]] = fields[5]
        return states

    def wait_up(self, *names: str, timeout: float = 20) -> None:
        wait_until(
            lambda: all(self.states().get(name) == UP for name in names),
            timeout,
            message=f"haproxy sees {names} up",
        )

    def wait_down(self, name: str, timeout: float = 20) -> None:
        wait_until(
            lambda: self.states().get(name) not in (UP, None),
            timeout,
            message=f"haproxy takes {name} down",
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def two_behind_haproxy(tmp_path: Path) -> Iterator[tuple[HAProxy, list[Backend]]]:
    backends = []
    for number in (1, 2):
        runtime_dir = tmp_path / f"run{number}"
        runtime_dir.mkdir(mode=0o700)
        config_path = tmp_path / f"echod{number}.toml"
        backend = Backend(f"echod{number}", free_port(), free_port(), runtime_dir, config_path)
        config_path.write_text(
            f'bind = ["127.0.0.1:{backend.port}"]\n'
            f'metrics_bind = "127.0.0.1:{backend.health_port}"\n'
            f"shutdown_delay = {SHUTDOWN_DELAY}\n"
            "graceful_timeout = 10\n"
            'proxy_protocol_from = ["127.0.0.1/32"]\n'  # where HAProxy connects from
            'deny = ["127.0.0.2/32"]\n'  # a client, seen only through the PROXY header
            f'access_log = "{tmp_path}/access{number}.log"\n'
        )
        backends.append(backend)
    haproxy: HAProxy | None = None
    try:
        for backend in backends:
            backend.start()
        haproxy = HAProxy(tmp_path, backends)
        haproxy.wait_up("echod1", "echod2")
        yield haproxy, backends
    finally:
        if haproxy is not None:
            haproxy.stop()
        for backend in backends:
            if backend.process is not None:
                backend.process.kill()


def under_load(haproxy: HAProxy, change: Callable[[], None]) -> tuple[int, int, list[str]]:
    """Steady connect/echo/close load through HAProxy while `change` runs."""
    with ClientLoad("127.0.0.1", haproxy.port, churners=4, held=0, max_seconds=120) as load:
        load.wait_for_progress(50)
        change()
        before = load.report.attempted
        load.wait_for_progress(before + 50)  # traffic flows after the change too
    report = load.report
    errors = report.errors[:3]
    print(f"through haproxy: attempted={report.attempted} failed={report.failed} {errors}")
    return report.attempted, report.failed, report.errors


def echo_through(haproxy: HAProxy, source: str, payload: bytes) -> tuple[int, bytes]:
    """(client port, what came back) for one connection from `source` via HAProxy."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", haproxy.port))
        sock.sendall(payload)
        received = b""
        try:
            while len(received) < len(payload) and (chunk := sock.recv(65536)):
                received += chunk
        except ConnectionResetError:
            pass
        return sock.getsockname()[1], received


def test_the_client_address_reaches_echod_and_its_deny_list(two_behind_haproxy, tmp_path) -> None:
    haproxy, _ = two_behind_haproxy
    port, echoed = echo_through(haproxy, "127.0.0.1", b"who am I")
    assert echoed == b"who am I"  # the PROXY header was consumed, not echoed
    logs = [tmp_path / "access1.log", tmp_path / "access2.log"]
    wait_until(
        lambda: any(f"peer=127.0.0.1:{port} " in p.read_text() for p in logs if p.exists()),
        10,
        message=f"the client's own port {port} in an access log",
    )
    # 127.0.0.2 is denied by echod; HAProxy (127.0.0.1) is not, and still connects
    _, echoed = echo_through(haproxy, "127.0.0.2", b"let me in")
    assert echoed == b""
    assert echo_through(haproxy, "127.0.0.1", b"still fine")[1] == b"still fine"


def test_rolling_restart_fails_no_connection(two_behind_haproxy) -> None:
    haproxy, backends = two_behind_haproxy

    def roll() -> None:
        for backend in backends:
            assert backend.process is not None
            termed = time.monotonic()
            backend.process.send_signal(signal.SIGTERM)
            haproxy.wait_down(backend.name)  # within the delay: /readyz said 503
            assert time.monotonic() - termed < SHUTDOWN_DELAY + 5
            assert backend.process.wait(30) == 0
            backend.start()
            haproxy.wait_up(backend.name)

    attempted, failed, errors = under_load(haproxy, roll)
    assert attempted >= 100
    assert failed == 0, errors[:5]


def test_usr2_upgrade_of_both_fails_no_connection(two_behind_haproxy) -> None:
    haproxy, backends = two_behind_haproxy

    def upgrade() -> None:
        for backend in backends:
            assert backend.process is not None
            result = run_echoctl("--runtime-dir", backend.runtime_dir, "upgrade", timeout=90)
            assert result.returncode == 0, result.stderr
            haproxy.wait_up(backend.name)

    attempted, failed, errors = under_load(haproxy, upgrade)
    assert attempted >= 100
    assert failed == 0, errors[:5]
    assert all(b.process is not None and b.process.proc.poll() is None for b in backends)


def _echod_totals(backend: Backend) -> dict[str, float]:
    return status_json(backend.runtime_dir)["totals"]


def test_echoctl_drain_takes_a_backend_out_of_rotation_and_keeps_its_conversations(
    two_behind_haproxy,
) -> None:
    haproxy, backends = two_behind_haproxy
    drained = backends[0]
    with ClientLoad("127.0.0.1", haproxy.port, churners=4, held=10, max_seconds=120) as load:
        load.wait_for_progress(50)
        asked = time.monotonic()
        result = run_echoctl("--runtime-dir", drained.runtime_dir, "drain")
        assert result.returncode == 0, result.stderr
        haproxy.wait_down(drained.name)
        out_of_rotation = time.monotonic() - asked
        time.sleep(0.5)  # connections HAProxy dispatched before it marked the server down
        totals = _echod_totals(drained)
        accepted = totals["connections"]
        held_there = totals["active"]  # leastconn spread the held ones over both backends
        attempted, roundtrips = load.report.attempted, load.report.held_roundtrips
        load.wait_for_progress(attempted + 300)
        assert _echod_totals(drained)["connections"] == accepted  # new ones: the other only
        still_held = _echod_totals(drained)["active"]
        roundtrips_while_drained = load.report.held_roundtrips - roundtrips
    report = load.report
    print(
        f"drain through haproxy: out of rotation after {out_of_rotation:.2f}s; "
        f"attempted={report.attempted} failed={report.failed} "
        f"(after the drain: {report.attempted - attempted}); held conversations on the "
        f"drained backend {held_there:.0f} -> {still_held:.0f}, "
        f"{roundtrips_while_drained} held round trips while drained"
    )
    assert out_of_rotation < 5  # inter x fall = 1 s, plus a busy machine's slack
    assert report.failed == 0, report.errors[:5]
    assert held_there >= 1
    assert still_held == held_there  # its conversations stayed open...
    assert roundtrips_while_drained > 0  # ...and kept echoing
    assert drained.process is not None and drained.process.proc.poll() is None
