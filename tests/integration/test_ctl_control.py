"""echoctl status and the control verbs against a real echod."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.echod import echo_roundtrip, run_echoctl, status_json, wait_until


def test_status_shows_the_real_pids_and_counts(start_echod, runtime_dir: Path) -> None:
    server = start_echod(workers=2)
    workers = server.wait_workers(2)
    held = [server.connect() for _ in range(3)]
    try:
        for sock in held:
            assert echo_roundtrip(sock, b"12345") == b"12345"

        def status() -> dict | None:
            document = status_json(runtime_dir)
            counts = sum(w["connections"] for w in document["workers"])
            # open connections are live; byte counters publish within a second
            published = document["totals"]["bytes_in"] >= 15
            return document if counts == 3 and published else None

        document = wait_until(status, 10, message="status to show 3 connections")
        assert document["master"]["pid"] == server.pid
        assert sorted(w["pid"] for w in document["workers"]) == workers
        assert {w["state"] for w in document["workers"]} == {"ready"}
        assert document["totals"]["connections"] >= 3
        assert document["totals"]["bytes_in"] >= 15
        assert all(w["rss_bytes"] > 0 and w["heartbeat_age_s"] < 30 for w in document["workers"])
        text = run_echoctl("--runtime-dir", str(runtime_dir), "status")  # option before verb
        assert text.returncode == 0
        assert f"master pid {server.pid}" in text.stdout
        assert all(str(pid) in text.stdout for pid in workers)
    finally:
        for sock in held:
            sock.close()


def test_status_exit_codes_when_not_running(tmp_path: Path) -> None:
    result = run_echoctl("status", "--runtime-dir", str(tmp_path))
    assert result.returncode == 3
    assert "not running" in result.stderr
    (tmp_path / "echod.pid").write_text("999999\n")  # left behind by a crash
    stale = run_echoctl("status", "--pidfile", str(tmp_path / "echod.pid"))
    assert stale.returncode == 1
    assert "pidfile" in stale.stderr


@pytest.mark.parametrize("verb", ["reload", "stop", "scale 2", "reopen-logs", "upgrade"])
def test_control_verbs_exit_3_when_nothing_runs(verb: str, tmp_path: Path) -> None:
    result = run_echoctl(*verb.split(), "--runtime-dir", str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert "not running" in result.stderr


def test_reload_waits_for_the_new_generation(start_echod, runtime_dir: Path) -> None:
    server = start_echod(workers=2)
    old = set(server.wait_workers(2))
    result = run_echoctl("reload", "--runtime-dir", str(runtime_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "generation 2 serving with 2 worker(s)" in result.stdout
    assert not old & set(server.wait_workers(2, exclude=old))


def test_reload_reports_a_broken_config(start_echod, runtime_dir: Path) -> None:
    server = start_echod(workers=1, config={"idle_timeout": 10})
    Path(server.argv[server.argv.index("-c") + 1]).write_text("idle_timeout = 'x'\n")
    result = run_echoctl("reload", "--runtime-dir", str(runtime_dir))
    assert result.returncode == 1
    assert "reload failed" in result.stderr  # errors go to stderr, stdout stays clean
    assert result.stdout == ""


def test_scale_sets_an_exact_count(start_echod, runtime_dir: Path) -> None:
    server = start_echod(workers=1)
    assert run_echoctl("scale", "3", "--runtime-dir", str(runtime_dir)).returncode == 0
    server.wait_workers(3)
    assert run_echoctl("scale", "1", "--runtime-dir", str(runtime_dir)).returncode == 0
    server.wait_workers(1)
    bad = run_echoctl("scale", "0", "--runtime-dir", str(runtime_dir))
    assert bad.returncode == 64
    assert "N must be 1 or more" in bad.stderr
    assert bad.stdout == ""


def test_upgrade_keeps_the_pid_and_replaces_workers(start_echod, runtime_dir: Path) -> None:
    server = start_echod(workers=2)
    old = set(server.wait_workers(2))
    result = run_echoctl("upgrade", "--runtime-dir", str(runtime_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"pid {server.pid}" in result.stdout
    wait_until(
        lambda: not old & set(server.worker_pids()) and len(server.worker_pids()) == 2,
        20,
        message="old workers gone",
    )
    assert server.proc.poll() is None


def test_reopen_logs(start_echod, runtime_dir: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "e.log"
    server = start_echod("--log-file", str(log_file), wait=False)
    wait_until(lambda: log_file.exists() and "ready" in log_file.read_text(), 15, message="ready")
    log_file.rename(tmp_path / "e.log.1")
    result = run_echoctl("reopen-logs", "--runtime-dir", str(runtime_dir))
    assert result.returncode == 0
    wait_until(log_file.exists, 10, message="re-created log file")
    assert server.proc.poll() is None


@pytest.mark.parametrize("fast", [False, True])
def test_stop_waits_until_the_master_is_gone(start_echod, runtime_dir: Path, fast: bool) -> None:
    server = start_echod(workers=2)
    result = run_echoctl("stop", *(["--fast"] if fast else []), "--runtime-dir", str(runtime_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.proc.poll() == 0  # already exited when echoctl returned (reaped here)
