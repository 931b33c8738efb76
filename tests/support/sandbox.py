"""Run a check script inside ../shared/systemd-sandbox (a booted Debian 12 with systemd).

The scripts print "ok - ..." / "not ok - ..." per check and end with
"N passed, N failed". Needs root and the sandbox next to the repository: a test
skips without them, unless REQUIRE_SYSTEMD_SANDBOX=1 (CI), where that fails it.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence

import pytest

from support.paths import REPO

SANDBOX = REPO.parent / "shared" / "systemd-sandbox" / "run-in-systemd.sh"
NOT_COPIED = (
    ".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "build",
    "dist", ".pybuild",
)  # fmt: skip


def require_sandbox() -> None:
    """Skip (or, in CI, fail) the calling test when the sandbox cannot run."""
    missing = []
    if os.geteuid() != 0:
        missing.append("the systemd sandbox needs root")
    if not os.access(SANDBOX, os.X_OK):
        missing.append(f"{SANDBOX} is missing")
    if missing:
        reason = "; ".join(missing)
        if os.environ.get("REQUIRE_SYSTEMD_SANDBOX") == "1":
            pytest.fail(f"REQUIRE_SYSTEMD_SANDBOX=1 but {reason}")
        pytest.skip(reason)


def run_checks(script: str, *, timeout: int, packages: Sequence[str] = ()) -> str:
    """Run ``bash script`` (relative to the repository) in the sandbox; assert that
    it passed every check; return its stdout. ``timeout`` is the sandbox's own
    limit (it then tears the container down itself): keep it below pytest's.
    ``packages`` are baked into the sandbox's cached rootfs (part of its cache key).
    """
    options = [f"--timeout={timeout}", *(f"--exclude={pattern}" for pattern in NOT_COPIED)]
    if packages:
        options.append(f"--packages={' '.join(packages)}")
    result = subprocess.run(
        [str(SANDBOX), *options, str(REPO), "bash", script],
        capture_output=True,
        text=True,
        timeout=timeout + 300,  # a first run also builds the rootfs
    )
    report = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-20000:]}"
    assert result.returncode == 0, report
    summary = re.findall(r"^(\d+) passed, (\d+) failed$", result.stdout, re.MULTILINE)
    assert summary, report
    passed, failed = map(int, summary[-1])
    assert (failed, passed > 0) == (0, True), report
    assert "not ok - " not in result.stdout, report
    return result.stdout
