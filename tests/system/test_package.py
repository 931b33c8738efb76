"""The Debian package, built and installed under a real systemd: tests/system/package/inside.sh.

In a fresh Debian 12 booted with systemd (../shared/systemd-sandbox): apt-get
build-dep ./ and make deb, lintian, apt-get install, then the service, the files
in their Debian places, echod's own integration tests on Debian's python3
packages, an in-place upgrade under load (reinstall), reload, remove and purge.
Needs root and the sandbox; skipped without them, unless REQUIRE_SYSTEMD_SANDBOX=1
(CI), where that is a failure.
"""

from __future__ import annotations

import pytest
from support.sandbox import require_sandbox, run_checks

INSIDE = "tests/system/package/inside.sh"
COMMAND_TIMEOUT_SECONDS = 1200
# Baked into the sandbox's cached rootfs, so that a run does not download them:
# the build dependencies (debian/control, and build-essential, which
# dpkg-checkbuilddeps wants), the runtime dependencies, and what the checks use.
# Not lintian: debootstrap fails configuring its libnet-ssleay-perl; the script
# installs it with apt-get.
PACKAGES = (
    "build-essential", "debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all",
    "python3-setuptools", "python3-daemon", "python3-prometheus-client", "python3-psutil",
    "python3-setproctitle", "python3-pytest", "python3-pytest-timeout", "python3-hypothesis",
    "man-db", "logrotate",
)  # fmt: skip


@pytest.mark.sandbox
@pytest.mark.timeout(COMMAND_TIMEOUT_SECONDS + 400)
def test_debian_package_under_real_systemd() -> None:
    require_sandbox()
    out = run_checks(INSIDE, timeout=COMMAND_TIMEOUT_SECONDS, packages=PACKAGES)
    print(out)  # the figures (lintian, upgrade under load, RSS): pytest -rP shows them
    assert "# upgrade under load: {" in out, out
