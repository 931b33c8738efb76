"""echod under a real systemd (PID 1 in a throw-away container): tests/system/sandbox/inside.sh.

Needs root and ../shared/systemd-sandbox/run-in-systemd.sh next to the repository;
skipped without them, unless REQUIRE_SYSTEMD_SANDBOX=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from support.paths import REPO

SANDBOX = REPO.parent / "shared" / "systemd-sandbox" / "run-in-systemd.sh"
INSIDE = "tests/system/sandbox/inside.sh"
# The sandbox's own limit, below pytest's, so it tears the container down itself.
COMMAND_TIMEOUT_SECONDS = 780
NOT_COPIED = (".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "build")


def missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("the systemd sandbox needs root")
    if not os.access(SANDBOX, os.X_OK):
        missing.append(f"{SANDBOX} is missing")
    return missing


@pytest.mark.sandbox
@pytest.mark.timeout(900)
def test_units_under_real_systemd() -> None:
    missing = missing_prerequisites()
    if missing:
        reason = "; ".join(missing)
        if os.environ.get("REQUIRE_SYSTEMD_SANDBOX") == "1":
            pytest.fail(f"REQUIRE_SYSTEMD_SANDBOX=1 but {reason}")
        pytest.skip(reason)
    excludes = [f"--exclude={pattern}" for pattern in NOT_COPIED]
    result = subprocess.run(
        [str(SANDBOX), f"--timeout={COMMAND_TIMEOUT_SECONDS}", *excludes, str(REPO),
         "bash", INSIDE],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS + 100,
    )  # fmt: skip
    report = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-20000:]}"
    assert result.returncode == 0, report
    summary = re.findall(r"^(\d+) passed, (\d+) failed$", result.stdout, re.MULTILINE)
    assert summary, report
    passed, failed = map(int, summary[-1])
    assert (failed, passed > 0) == (0, True), report
    assert "not ok - " not in result.stdout, report
