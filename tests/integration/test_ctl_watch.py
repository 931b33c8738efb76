"""echoctl status --watch against a real echod: piped blocks, JSON lines, bad
values, signals, the master going away, and the live view in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest
from support.echod import ECHOCTL, child_env, echo_roundtrip, run_echoctl, wait_until

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(ready|booting|draining|retiring)\s+\d+\s+(\S+)", re.M)


def test_piped_watch_prints_plain_blocks_without_escapes(start_echod, runtime_dir: Path) -> None:
    server = start_echod(workers=2)
    result = run_echoctl(
        "status", "--runtime-dir", runtime_dir, "--watch", "0.2", "--count", "3", timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert result.stdout.startswith("--- ")
    blocks = re.split(r"^(?=--- \d{4}-)", result.stdout, flags=re.M)[1:]
    assert len(blocks) == 3, result.stdout
    for block in blocks:
        assert block.endswith("\n\n"), block  # a blank line after each frame
        pids = {int(m.group(2)) for m in ROW.finditer(block)}
        assert pids == set(server.worker_pids()), block


def test_watch_json_lines_parse(start_echod, runtime_dir: Path) -> None:
    server = start_echod(workers=2)
    result = run_echoctl(
        "status", "--runtime-dir", runtime_dir, "--watch", "0.2", "--count", "2", "--json"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        frame = json.loads(line)
        assert frame["master"]["pid"] == server.proc.pid
        assert {w["pid"] for w in frame["workers"]} == set(server.worker_pids())
        assert {"connections_per_s", "bytes_in_per_s", "share"} <= frame["workers"][0].keys()


@pytest.mark.parametrize(
    "argv",
    [
        ("--watch", "0.05"),
        ("--watch", "3601"),
        ("--watch", "nan"),
        ("--watch", "soon"),
        ("--watch", "1", "--count", "0"),
        ("--count", "2"),  # without --watch
    ],
)
def test_bad_watch_values_exit_64(argv: tuple[str, ...], tmp_path: Path) -> None:
    result = run_echoctl("status", "--runtime-dir", tmp_path, *argv)
    assert result.returncode == 64, result
    assert result.stdout == ""
    assert result.stderr.startswith("echoctl status: error:"), result.stderr


def test_watch_without_echod_exits_3(tmp_path: Path) -> None:
    result = run_echoctl("status", "--runtime-dir", tmp_path, "--watch", "0.2")
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1


def test_watch_exits_3_when_the_master_goes_and_143_on_sigterm(
    start_echod, runtime_dir: Path, tmp_path: Path
) -> None:
    server = start_echod(workers=1)
    for signum, expected in ((signal.SIGTERM, 143), (None, 3)):
        out = tmp_path / f"watch-{expected}.out"
        with out.open("w") as sink:
            watcher = subprocess.Popen(
                [*ECHOCTL, "status", "--runtime-dir", str(runtime_dir), "--watch", "0.2"],
                stdout=sink,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )
        try:
            wait_until(lambda out=out: out.read_text().count("--- ") >= 1, 15, message="a frame")
            if signum is not None:
                watcher.send_signal(signum)
            else:
                server.send_signal(signal.SIGTERM)
                assert server.wait(20) == 0
            _, stderr = watcher.communicate(timeout=20)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
        assert watcher.returncode == expected, stderr
        assert b"Traceback" not in stderr
        if expected == 3:
            assert stderr.decode().count("\n") == 1 and "no longer running" in stderr.decode()


@pytest.mark.parametrize(("key", "expected"), [("q", 0), ("C-c", 0), ("SIGTERM", 143)])
def test_live_view_in_a_terminal(start_echod, runtime_dir: Path, key: str, expected: int) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux is not installed (.ci/run installs it)")
    server = start_echod(workers=2)
    socket_name = f"echod-watch-{uuid.uuid4().hex[:12]}"
    base = [tmux, "-L", socket_name, "-f", os.devnull]
    watch = shlex.join([*ECHOCTL, "status", "--runtime-dir", str(runtime_dir), "--watch", "0.3"])
    script = (
        # A trap with a command (not '') survives Ctrl-C without passing SIG_IGN on.
        "trap : INT; echo BEFORE-WATCH; saved=$(stty -g); "
        f"{watch}; rc=$?; "
        '[ "$(stty -g)" = "$saved" ] && echo TTY-RESTORED; '
        'echo "WATCH-EXIT=$rc"; sleep 60'
    )

    def pane() -> str:
        return subprocess.run(
            [*base, "capture-pane", "-p", "-t", "watch"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout

    subprocess.run(
        [*base, "new-session", "-d", "-s", "watch", "-x", "120", "-y", "40", "sh", "-c", script],
        check=True,
        env=child_env(),
        timeout=10,
    )
    try:
        workers = set(server.worker_pids())
        wait_until(
            lambda: {int(m.group(2)) for m in ROW.finditer(pane())} == workers,
            20,
            message="the worker rows",
        )

        def busy() -> bool:
            for _ in range(5):
                with server.connect() as sock:
                    echo_roundtrip(sock, b"ping")
            return any(m.group(4) not in ("-", "0.0") for m in ROW.finditer(pane()))

        wait_until(busy, 20, interval=0.05, message="a nonzero conn/s")
        if key == "SIGTERM":
            shell = subprocess.run(
                [*base, "list-panes", "-t", "watch", "-F", "#{pane_pid}"],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            )
            (watcher,) = psutil.Process(int(shell.stdout)).children()
            watcher.send_signal(signal.SIGTERM)
        else:
            subprocess.run([*base, "send-keys", "-t", "watch", key], check=True, timeout=10)
        screen = wait_until(
            lambda: text if "WATCH-EXIT=" in (text := pane()) else None, 20, message="exit"
        )
        assert f"WATCH-EXIT={expected}" in screen, screen
        assert "TTY-RESTORED" in screen, screen
        # Back on the normal screen: what was there before, none of the view.
        assert "BEFORE-WATCH" in screen and "WORKER" not in screen, screen
    finally:
        subprocess.run([*base, "kill-server"], check=False, timeout=10)
