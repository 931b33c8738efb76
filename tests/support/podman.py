"""podman for the image tests: run it with the repository's containers.conf, one test at a time.

Every call goes through :func:`podman`, with ``CONTAINERS_CONF`` set to
``container/containers.conf`` (runc, cgroupfs, ulimits within the host's hard
limits: what podman 4.3 needs on hosts like CI's) and a timeout, so that a
hung podman fails one test instead of the run. The tests use fixed names
(kube play's pod, the ConfigMap's volume), so they hold :func:`exclusive`
while they use podman: pytest-xdist workers take turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.paths import REPO

CONTAINERS_CONF = REPO / "container" / "containers.conf"
LOCK = Path("/tmp/echod-podman-tests.lock")
DEFAULT_TIMEOUT = 120.0


def require_podman() -> None:
    """Skip (or, with REQUIRE_PODMAN=1 as in CI, fail) the calling test when podman cannot run."""
    tools = ("podman", "runc", "mmdebstrap", "slirp4netns")
    missing = [tool for tool in tools if not shutil.which(tool)]
    reasons = [f"{', '.join(missing)} not installed"] if missing else []
    if os.geteuid() != 0:
        reasons.append("the image tests run podman as root")
    if reasons:
        reason = "; ".join(reasons)
        if os.environ.get("REQUIRE_PODMAN") == "1":
            pytest.fail(f"REQUIRE_PODMAN=1 but {reason}")
        pytest.skip(reason)


def environment() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(
    *args: str, timeout: float = DEFAULT_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` to completion; with ``check``, fail the test on a non-zero exit."""
    result = subprocess.run(
        ["podman", *args],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert result.returncode == 0, (
            f"podman {' '.join(args)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-5000:]}"
        )
    return result


def inspect(name: str, template: str) -> str:
    return podman("inspect", "--format", template, name).stdout.strip()


def json_log_lines(name: str) -> list[dict[str, object]]:
    """The container's log (stdout and stderr), each line parsed as JSON (fails on any other)."""
    result = podman("logs", name)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line of {name} is not JSON: {line!r}")
    return records


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the image tests' lock (a file lock, released if the process dies)."""
    with LOCK.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def free_tcp_and_udp_port() -> int:
    """A loopback port number free for TCP and for UDP at once (echod binds both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise AssertionError("no loopback port free for both TCP and UDP in 100 tries")
