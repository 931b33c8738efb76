"""Fixtures that run the real ``echod`` as a subprocess on ephemeral loopback ports.

Helpers live in the ``support`` package (tests/support); this file only wires
them to pytest, so that every process a test starts is killed at teardown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from support.echod import EchodProcess, child_env, echod_command, to_toml

# Property tests: CI replays the same examples every run (a red run can be re-run
# and means the code changed); a developer's run keeps exploring, and a failure
# prints the blob that reproduces it (@reproduce_failure).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def start_echod(runtime_dir: Path, tmp_path: Path) -> Iterator[Callable[..., EchodProcess]]:
    """Start the real server: start_echod("-w", "2", config={...}, wait=True)."""
    started: list[EchodProcess] = []

    def start(
        *args: str,
        config: dict[str, Any] | str | None = None,
        workers: int = 1,
        bind: list[str] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        foreground: bool = True,
        nofile: int | tuple[int, int] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> EchodProcess:
        argv = echod_command()
        if foreground:
            argv.append("-F")
        argv += ["--runtime-dir", str(runtime_dir)]
        if config is not None:
            path = tmp_path / f"echod-{len(started)}.toml"
            path.write_text(config if isinstance(config, str) else to_toml(config))
            argv += ["-c", str(path)]
        if not any(a in ("-w", "--workers") for a in args) and workers:
            argv += ["-w", str(workers)]
        if (
            bind is None
            and not any(a in ("-b", "--bind") for a in args)
            and not (isinstance(config, dict) and "bind" in config)
        ):
            bind = ["127.0.0.1:0"]
        for address in bind or []:
            argv += ["-b", address]
        argv += list(args)
        process = EchodProcess(argv, child_env(env), runtime_dir, nofile, preexec)
        started.append(process)
        if wait:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.kill()
        # shown by pytest only when the test failed
        print(f"--- output of {' '.join(process.argv)}\n{process.output}")
