"""The shipped systemd units: systemd-analyze verify (silent) and security (<= 2.0).

The units run a bare `echod`, which systemd looks up in its fixed search path
(/usr/bin for the Debian package, /usr/local/bin for the README's venv install): one
file for both. echod is in neither on a build machine, and `systemd-analyze verify`
reports a missing executable. `--root=` is no way out: it then needs a whole unit
tree (sysinit.target, ...) under that root. So the tests verify a copy of the units
in which the command is rewritten to an executable stub in a temp dir, and check
separately that the command is the only thing verify objects to in the originals.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from support.paths import REPO

UNIT_DIR = REPO / "systemd"
UNITS = ("echod.service", "echod.socket")
INSTALLED_ECHOD = "echod"  # no directory: see above
GRACEFUL_TIMEOUT_DEFAULT = 30
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def units_with_stub(tmp_path: Path) -> list[Path]:
    """Copies of the units whose echod path points at an existing executable."""
    stub = tmp_path / "bin" / "echod"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        copy = tmp_path / name
        copy.write_text(text.replace(f"={INSTALLED_ECHOD} ", f"={stub} "))
        copies.append(copy)
    return copies


def directives(name: str) -> dict[str, list[str]]:
    """'Section.Key' -> values, in order (systemd keys may repeat)."""
    found: dict[str, list[str]] = defaultdict(list)
    section = ""
    for raw in (UNIT_DIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found[f"{section}.{key}"].append(value)
    return found


# Documentation= names the man pages, which are not installed on a build machine
# (tests/system/package checks them with man -w once the package is installed).
NO_MAN = "--man=no"


def test_verify_prints_nothing(units_with_stub: list[Path]) -> None:
    result = analyze("verify", NO_MAN, *units_with_stub)
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


def test_the_install_path_is_all_that_verify_misses_in_the_originals() -> None:
    result = analyze("verify", NO_MAN, *(UNIT_DIR / name for name in UNITS))
    complaints = set((result.stdout + result.stderr).splitlines())
    assert complaints <= {
        f"echod.service: Command {INSTALLED_ECHOD} is not executable: No such file or directory"
    }


def test_every_command_is_path_neutral_or_a_system_tool() -> None:
    """No install prefix in the units: the package and the venv route share them."""
    service = directives("echod.service")
    commands = [
        value.lstrip("-@:+!")
        for key in ("Service.ExecStartPre", "Service.ExecStart", "Service.ExecReload")
        for value in service[key]
    ]
    for command in commands:
        program = command.split()[0]
        assert program == INSTALLED_ECHOD or program == "/bin/kill", command
    assert "/opt/" not in (UNIT_DIR / "echod.service").read_text().split("[Unit]")[1]


def test_security_exposure_is_low(units_with_stub: list[Path]) -> None:
    service = units_with_stub[0]
    result = analyze("security", "--offline=true", "--no-pager", service)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for echod\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_service_contract() -> None:
    service = directives("echod.service")
    check = f"{INSTALLED_ECHOD} --check-config --config /etc/echod/echod.toml"
    assert service["Service.Type"] == ["notify"]
    assert service["Service.NotifyAccess"] == ["main"]
    assert service["Service.ExecStartPre"] == [check]
    [start] = service["Service.ExecStart"]
    assert start.startswith(f"{INSTALLED_ECHOD} --foreground --config /etc/echod/echod.toml")
    assert "--runtime-dir /run/echod" in start
    assert service["Service.ExecReload"] == [check, "/bin/kill -HUP $MAINPID"]
    assert service["Service.KillMode"] == ["mixed"]
    assert int(service["Service.TimeoutStopSec"][0]) > GRACEFUL_TIMEOUT_DEFAULT
    assert service["Service.Restart"] == ["on-failure"]
    assert service["Service.RestartPreventExitStatus"] == ["64 78"]
    assert service["Service.RuntimeDirectory"] == ["echod"]
    assert service["Service.AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert service["Service.CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert service["Service.WatchdogSec"] == ["30"]


def test_socket_contract() -> None:
    socket_unit = directives("echod.socket")
    assert socket_unit["Socket.ListenStream"] == ["7"]
    assert socket_unit["Socket.ListenDatagram"] == ["7"]
    assert socket_unit["Socket.Service"] == ["echod.service"]
    assert socket_unit["Socket.FileDescriptorName"] == ["echo"]
