"""The generated man pages render cleanly with the real groff and man."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from docgen import generate
from support.paths import REPO

MAN = REPO / "echod" / "data"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # fail, not skip: a silent skip would hide broken pages
        pytest.fail(f"{name} is not installed (apt-get install groff man-db)")
    return path


@pytest.mark.parametrize("name", generate.MAN_FILES)
def test_groff_renders_without_a_warning(name: str) -> None:
    result = subprocess.run(
        [_tool("groff"), "-man", "-Tutf8", "-ww", str(MAN / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"groff warnings in {name} (fix them in tools/docgen):\n" + (
        result.stderr
    )
    assert generate.DATE in result.stdout  # the footer: the page rendered to its end


@pytest.mark.parametrize("name", generate.MAN_FILES)
def test_man_renders_the_page(name: str) -> None:
    env = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
    result = subprocess.run(
        [_tool("man"), "-l", str(MAN / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    title = name.rsplit("/", 1)[1].rsplit(".", 1)[0].upper()
    assert title in result.stdout
