"""The sdist and the wheel: built with `python -m build`, checked by `twine check --strict`,
and complete (SPEC "Packages": a LICENSE file; the sdist carries etc/, systemd/, tests/).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from support.paths import REPO

VERSION_GLOB = "echod-*"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [sdist] = out.glob(f"{VERSION_GLOB}.tar.gz")
    [wheel] = out.glob(f"{VERSION_GLOB}.whl")
    return sdist, wheel


@pytest.mark.timeout(400)
def test_twine_check_strict_passes(built: tuple[Path, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, built)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


@pytest.mark.timeout(400)
def test_the_sdist_carries_the_project(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for expected in (
        "LICENSE",
        "etc/echod.toml",
        "etc/logrotate.d/echod",
        "systemd/echod.service",
        "systemd/echod.socket",
        "tests/conftest.py",
        "tests/support/echod.py",
        "tests/integration/test_echo.py",
        "debian/control",
        "container/Containerfile",
    ):
        assert expected in names, expected
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.timeout(400)
def test_the_wheel_carries_the_license_and_the_generated_docs(built: tuple[Path, Path]) -> None:
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    # dist-info/LICENSE (setuptools < 77) or dist-info/licenses/LICENSE (newer)
    assert any(name.endswith("LICENSE") and ".dist-info/" in name for name in names), names
    for page in ("echod.8", "echoctl.1", "echod.toml.5"):
        assert f"echod/data/man/{page}" in names
