"""Throw-away cgroup v1 directories for tests that need real kernel facts.

CI (and this machine) runs as root with writable v1 hierarchies under
/sys/fs/cgroup/{cpu,memory}. A test makes a cgroup, writes its limits, moves
the process it starts into it (``enter``, a preexec_fn) and the fixture removes
it at teardown, once the kernel has let every task go.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

import pytest

V1_ROOT = Path("/sys/fs/cgroup")


def require_v1(controller: str) -> Path:
    """The v1 hierarchy of ``controller``; skipped where it is missing, a failure in CI."""
    base = V1_ROOT / controller
    usable = os.geteuid() == 0 and (base / "cgroup.procs").exists() and os.access(base, os.W_OK)
    if not usable:
        message = f"needs root and a writable cgroup v1 {controller} hierarchy at {base}"
        if os.environ.get("REQUIRE_CGROUP_V1") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return base


class Cgroup:
    def __init__(self, controller: str) -> None:
        self.path = require_v1(controller) / f"echod-test-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()

    def write(self, name: str, value: str | int) -> None:
        (self.path / name).write_text(f"{value}\n")

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def enter(self) -> None:
        """A preexec_fn: the child moves itself in ("0" = the writing process)."""
        with open(self.path / "cgroup.procs", "w") as handle:
            handle.write("0\n")

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(line) for line in self.read("cgroup.procs").split()]
        return []

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left inside, then rmdir (EBUSY until the last task is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
