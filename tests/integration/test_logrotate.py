"""The shipped etc/logrotate.d/echod, run by Debian's real logrotate against a real echod."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.echod import echo_roundtrip, wait_until
from support.paths import ETC

SHIPPED = ETC / "logrotate.d" / "echod"
PEER = re.compile(r" peer=(\S+)")


def _logrotate() -> str:
    path = shutil.which("logrotate") or shutil.which("/usr/sbin/logrotate")
    if path is None:
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail("logrotate is not installed (.ci/run installs it)")
        pytest.skip("logrotate is not installed")
    return path


def test_the_shipped_file_parses() -> None:
    result = subprocess.run(
        [_logrotate(), "-d", str(SHIPPED)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


def _derived_config(logs: Path, runtime_dir: Path) -> str:
    """The shipped directives, with tmp_path paths and this venv's echoctl."""
    text = SHIPPED.read_text()
    assert "/var/log/echod/*.log" in text
    text = text.replace("/var/log/echod/*.log", f"{logs}/*.log")
    command = re.search(r"^\s*(echoctl .*)$", text, re.MULTILINE)  # a bare name: on PATH
    assert command, "postrotate calls echoctl"
    ours = f"{sys.executable} -m echod.ctl.main --runtime-dir {runtime_dir} reopen-logs"
    text = text.replace(command.group(1), ours)
    if os.geteuid() != 0:
        text = re.sub(r"^\s*su .*$", "", text, flags=re.MULTILINE)  # su needs root
    return text


def _peers(path: Path) -> list[str]:
    try:
        return PEER.findall(path.read_text())
    except FileNotFoundError:
        return []


def test_rotation_loses_and_duplicates_nothing(start_echod, tmp_path: Path, runtime_dir) -> None:
    logrotate = _logrotate()
    logs = tmp_path / "logs"
    logs.mkdir()
    access = logs / "access.log"
    server = start_echod(workers=2, config={"access_log": str(access)})
    config = tmp_path / "logrotate.conf"
    config.write_text(_derived_config(logs, runtime_dir))
    config.chmod(0o600)

    peers: list[str] = []  # each connection's client address: its id in the access log
    stop = threading.Event()

    def traffic() -> None:
        for _ in range(5000):  # bounded; stopped once the rotation is done
            if stop.is_set():
                return
            with server.connect() as sock:
                assert echo_roundtrip(sock, b"rotate me") == b"rotate me"
                host, port = sock.getsockname()[:2]
                peers.append(f"{host}:{port}")

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    wait_until(lambda: len(peers) >= 20, 30, message="traffic before the rotation")
    result = subprocess.run(
        [logrotate, "-f", "-s", str(tmp_path / "state"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    before_stop = len(peers)
    wait_until(lambda: len(peers) >= before_stop + 20, 30, message="traffic after the rotation")
    stop.set()
    thread.join(30)
    assert not thread.is_alive()

    rotated = logs / "access.log.1"  # delaycompress: the newest rotation stays plain
    assert rotated.exists(), sorted(p.name for p in logs.iterdir())
    wait_until(
        lambda: len(_peers(rotated)) + len(_peers(access)) >= len(peers),
        15,
        message="every access line written",
    )
    old, new = _peers(rotated), _peers(access)
    assert sorted(old + new) == sorted(peers), "each connection exactly once"
    assert new, "lines after the rotation land in the new file"
    # a worker reopens when its USR1 arrives, maybe just after echoctl returned, so
    # only the last of the 20+ connections since is sure to be in the new file
    assert peers[-1] in new, "connections after the reopen are in the new file"
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"still serving") == b"still serving"
