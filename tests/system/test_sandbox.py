"""echod under a real systemd (PID 1 in a throw-away container): tests/system/sandbox/inside.sh.

Needs root and ../shared/systemd-sandbox/run-in-systemd.sh next to the repository;
skipped without them, unless REQUIRE_SYSTEMD_SANDBOX=1 (CI), where that is a failure.
"""

from __future__ import annotations

import pytest
from support.sandbox import require_sandbox, run_checks

INSIDE = "tests/system/sandbox/inside.sh"
# The sandbox's own limit, below pytest's, so it tears the container down itself.
COMMAND_TIMEOUT_SECONDS = 780


@pytest.mark.sandbox
@pytest.mark.timeout(900)
def test_units_under_real_systemd() -> None:
    require_sandbox()
    run_checks(INSIDE, timeout=COMMAND_TIMEOUT_SECONDS)
