"""echod as systemd sees it, without systemd: a datagram socket plays NOTIFY_SOCKET,
and systemd-socket-activate hands echod its listening socket."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support.echod import (
    EchodProcess,
    child_env,
    echo_roundtrip,
    echod_command,
    free_port,
    wait_until,
)
from support.paths import ETC


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def wait_for(
        self, key: str, value: str | None = None, after: int = 0, timeout: float = 20
    ) -> int:
        """Index of the first message from `after` on that has key (=value)."""

        def find() -> int | None:
            self.poll()
            for index, message in enumerate(self.messages[after:], after):
                if key in message and (value is None or message[key] == value):
                    return index + 1  # +1: truthy even for the first message
            return None

        return wait_until(find, timeout, message=f"{key}={value} from echod") - 1


def test_notify_ready_reloading_ready_stopping_and_watchdog(
    tmp_path: Path, runtime_dir: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    argv = [
        *echod_command(),
        "-F",
        "-w",
        "2",
        "-b",
        "127.0.0.1:0",
        "--runtime-dir",
        str(runtime_dir),
    ]
    env = child_env({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    server = EchodProcess(argv, env, runtime_dir)
    try:
        ready = notify.wait_for("READY", "1")
        assert "worker(s) serving" in notify.messages[ready].get("STATUS", "")
        watchdog = notify.wait_for("WATCHDOG", "1", after=ready)
        assert watchdog >= 0
        server.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1", after=ready)
        monotonic_usec = int(notify.messages[reloading]["MONOTONIC_USEC"])
        assert abs(monotonic_usec / 1e6 - time.monotonic()) < 30  # CLOCK_MONOTONIC
        ready_again = notify.wait_for("READY", "1", after=reloading)
        server.send_signal(signal.SIGUSR2)
        upgrading = notify.wait_for("RELOADING", "1", after=ready_again)
        ready_after_upgrade = notify.wait_for("READY", "1", after=upgrading)
        server.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", "1", after=ready_after_upgrade)
        assert ready < reloading < ready_again < upgrading < ready_after_upgrade < stopping
        assert server.wait(20) == 0
    finally:
        server.kill()
        notify.sock.close()


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
def test_socket_activation_hands_echod_its_socket(tmp_path: Path, runtime_dir: Path) -> None:
    port = free_port()
    argv = [
        "systemd-socket-activate",
        "-l",
        f"127.0.0.1:{port}",
        *echod_command(),
        "-F",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "--runtime-dir",
        str(runtime_dir),
    ]
    activator = EchodProcess(argv, child_env(), runtime_dir)
    try:
        activator.wait_for_log("Listening on")

        def first_echo() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    return echo_roundtrip(sock, b"activated") == b"activated"
            except ConnectionRefusedError:
                return False

        assert wait_until(first_echo, 20, message="the first connection to be echoed")
        activator.wait_for_log(rf"listening on 127.0.0.1:{port}")
        # echod never bound the port itself: the socket is systemd's (fd 3)
        assert "address already in use" not in activator.output
        activator.send_signal(signal.SIGHUP)
        activator.wait_for_log("generation 2 serving")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert echo_roundtrip(sock, b"after reload") == b"after reload"
    finally:
        activator.kill()


def test_check_config_is_what_the_unit_runs_first(tmp_path: Path) -> None:
    shipped = ETC / "echod.toml"
    result = subprocess.run(
        [*echod_command(), "--check-config", "--config", str(shipped)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
    )
    assert result.returncode == 0 and result.stdout.strip() == "configuration OK"
