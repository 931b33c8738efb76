"""Notifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod.system.systemd import SYSTEMD_CHILD_VARIABLES, Notifier, scrub_child_environ

RECEIVE_TIMEOUT_SECONDS = 5.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket on a path, and the NOTIFY_SOCKET value naming it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(RECEIVE_TIMEOUT_SECONDS)
        yield receiver, str(path)


@pytest.fixture
def abstract_notify_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"echod-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(RECEIVE_TIMEOUT_SECONDS)
        yield receiver, "@" + name


def received(receiver: socket.socket) -> list[str]:
    return receiver.recv(4096).decode().split("\n")


def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


def test_unsupported_notify_socket_scheme_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="echod.systemd"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert "vsock" in caplog.text


@pytest.mark.parametrize("socket_fixture", ["notify_socket", "abstract_notify_socket"])
def test_each_message(socket_fixture: str, request: pytest.FixtureRequest) -> None:
    receiver, address = request.getfixturevalue(socket_fixture)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready() is True
    assert received(receiver) == ["READY=1"]
    assert notifier.ready(status="serving 2 workers") is True
    assert received(receiver) == ["READY=1", "STATUS=serving 2 workers"]
    assert notifier.stopping() is True
    assert received(receiver) == ["STOPPING=1"]
    assert notifier.watchdog() is True
    assert received(receiver) == ["WATCHDOG=1"]


def test_reloading_carries_the_monotonic_timestamp(
    notify_socket: tuple[socket.socket, str],
) -> None:
    receiver, address = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier.from_environ({"NOTIFY_SOCKET": address}).reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(receiver)
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_text_stays_on_one_line(notify_socket: tuple[socket.socket, str]) -> None:
    receiver, address = notify_socket
    Notifier.from_environ({"NOTIFY_SOCKET": address}).status("reload failed:\nbad key")
    assert received(receiver) == ["STATUS=reload failed: bad key"]


def test_generic_notify_and_send(notify_socket: tuple[socket.socket, str]) -> None:
    receiver, address = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.notify(READY=1, STATUS="up", ERRNO=0) is True
    assert received(receiver) == ["READY=1", "STATUS=up", "ERRNO=0"]
    assert notifier.send(["FDSTORE=1", "FDNAME=echo"]) is True
    assert received(receiver) == ["FDSTORE=1", "FDNAME=echo"]


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="echod.systemd"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert "nobody-listens" in caplog.text


def test_child_process_notifies_through_the_environment(
    notify_socket: tuple[socket.socket, str],
) -> None:
    receiver, address = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": address}
    code = "from echod.system.systemd import Notifier; Notifier.from_environ().ready('child')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert received(receiver) == ["READY=1", "STATUS=child"]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{own}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    pids = {"own": os.getpid(), "other": os.getpid() + 1}
    env = {key: value.format(**pids) for key, value in environ.items()}
    env["NOTIFY_SOCKET"] = "/run/systemd/notify"
    assert Notifier.from_environ(env).watchdog_interval() == expected


def test_watchdog_interval_needs_a_notify_socket() -> None:
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


def test_scrub_child_environ_removes_systemd_variables_only() -> None:
    env = {name: "1" for name in SYSTEMD_CHILD_VARIABLES} | {"PATH": "/bin", "HOME": "/root"}
    assert scrub_child_environ(env) is env
    assert env == {"PATH": "/bin", "HOME": "/root"}
    assert set(SYSTEMD_CHILD_VARIABLES) == {
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    }
