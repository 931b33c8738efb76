"""Reload, recycling, log reopening and the in-place upgrade, each under load."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
from support.echod import echo_roundtrip, wait_until
from support.load import ClientLoad

from echod.scoreboard import Scoreboard


def _all_replaced(server, old: set[int], count: int) -> list[int] | None:
    pids = server.worker_pids()
    return pids if len(pids) == count and not old & set(pids) else None


def _new_generation(server, old: set[int], count: int) -> list[int] | None:
    """The new workers, while old ones may still drain held conversations."""
    fresh = [pid for pid in server.worker_pids() if pid not in old]
    return fresh if len(fresh) == count else None


def test_hup_under_churn_and_held_conversations_loses_nothing(start_echod) -> None:
    server = start_echod(workers=2)
    old = set(server.wait_workers(2))
    with ClientLoad(server.host, server.port) as load:
        load.wait_for_progress(50)
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: _new_generation(server, old, 2), 20, message="new generation")
        server.wait_for_log("generation 2 serving")
        load.wait_for_progress(load.report.attempted + 50)
    report = load.report
    print(f"HUP under load: {report}")
    assert report.failed == 0, str(report)
    assert report.attempted > 100 and report.held_roundtrips > 0
    # the held conversations are over: the old generation has nothing left to drain
    wait_until(lambda: _all_replaced(server, old, 2), 20, message="old generation gone")


def test_hup_with_a_broken_config_keeps_the_old_one(start_echod, tmp_path: Path) -> None:
    server = start_echod(workers=1, config={"idle_timeout": 100})
    config_path = Path(server.argv[server.argv.index("-c") + 1])
    old = server.wait_workers(1)
    config_path.write_text("wokers = 2\n")
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload failed, keeping the running configuration: .*wokers", start=mark)
    assert server.worker_pids() == old
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"still serving") == b"still serving"


def test_hup_adds_and_removes_binds(start_echod, tmp_path: Path) -> None:
    from support.echod import connection_refused, free_port

    first, second = free_port(), free_port()
    config_path = tmp_path / "binds.toml"
    config_path.write_text(f'bind = ["127.0.0.1:{first}"]\nworkers = 1\n')
    server = start_echod("-c", str(config_path), bind=[], workers=0)
    held = server.connect()  # on the address that stays
    config_path.write_text(f'bind = ["127.0.0.1:{first}", "127.0.0.1:{second}"]\nworkers = 1\n')
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(rf"listening on 127.0.0.1:{second}")
    server.wait_for_log("generation 2 serving")
    import socket

    for port in (first, second):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert echo_roundtrip(sock, b"both") == b"both"
    assert echo_roundtrip(held, b"kept") == b"kept"
    config_path.write_text(f'bind = ["127.0.0.1:{second}"]\nworkers = 1\n')
    server.send_signal(signal.SIGHUP)
    server.wait_for_log("generation 3 serving")

    held.close()
    wait_until(
        lambda: connection_refused("127.0.0.1", first), 20, message=f"port {first} to be closed"
    )
    with socket.create_connection(("127.0.0.1", second), timeout=10) as sock:
        assert echo_roundtrip(sock, b"second") == b"second"


def test_ttou_victim_drains_gracefully(start_echod) -> None:
    server = start_echod(workers=2, config={"max_connections": 1})
    first, second = server.connect(), server.connect()  # one on each worker
    for sock in (first, second):
        assert echo_roundtrip(sock, b"x") == b"x"
    server.send_signal(signal.SIGTTOU)
    server.wait_for_log(r"draining \(stop requested\): 1 connection")
    for sock in (first, second):  # the retiring worker still serves its conversation
        assert echo_roundtrip(sock, b"still") == b"still"
    first.close()
    second.close()
    server.wait_workers(1)


def test_recycling_after_max_connections_per_child(start_echod) -> None:
    server = start_echod(workers=1, config={"max_connections_per_child": 20})
    (original,) = server.wait_workers(1)
    for index in range(60):
        with server.connect() as sock:
            message = f"n{index}".encode()
            assert echo_roundtrip(sock, message) == message
    server.wait_for_log(r"recycling after 2\d connections")
    wait_until(lambda: original not in server.worker_pids(), 15, message="recycled worker")
    server.wait_workers(1)


def test_recycling_on_max_worker_memory(start_echod) -> None:
    server = start_echod(workers=1, config={"max_worker_memory": 1024})
    (original,) = server.wait_workers(1)
    # no metrics_bind: no metrics process either, the worker alone decides
    assert [p.pid for p in psutil.Process(server.pid).children()] == [original]
    # the worker's own verdict (it samples its USS every 3 s), then the master's replacement
    server.wait_for_log(
        rf"\[worker 1 {original}\] recycling: memory \d+ bytes > "
        r"max_worker_memory 1024",
        timeout=20,
    )
    server.wait_for_log(rf"recycling worker 1 \(pid {original}\)", timeout=10)
    wait_until(lambda: original not in server.worker_pids(), 20, message="recycled worker")
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"fresh") == b"fresh"


def test_usr1_recreates_a_moved_log_file(start_echod, tmp_path: Path) -> None:
    log_file = tmp_path / "echod.log"
    server = start_echod("--log-file", str(log_file), workers=1, wait=False)
    wait_until(
        lambda: log_file.exists() and "ready" in log_file.read_text(),
        15,
        message="ready in the log file",
    )
    moved = tmp_path / "echod.log.1"
    log_file.rename(moved)
    server.send_signal(signal.SIGUSR1)
    wait_until(log_file.exists, 10, message="a new log file")
    server.send_signal(signal.SIGTTIN)  # something for master and a worker to log
    wait_until(
        lambda: "started worker 2" in log_file.read_text(),
        10,
        message="new lines in the new log file",
    )
    assert "reopening log files" in moved.read_text()


def _fake_distribution(root: Path, version: str) -> None:
    """A dist-info that shadows the installed one, so a test can 'install' a version."""
    info = root / "echod-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: echod\nVersion: {version}\n")


def test_usr2_upgrades_in_place_under_load(start_echod, tmp_path: Path, runtime_dir) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "1.0.0")
    server = start_echod(workers=2, env={"PYTHONPATH": str(site)})
    old = set(server.wait_workers(2))
    board = Scoreboard.attach(str(runtime_dir / "echod.scoreboard"), writable=False)
    before = board.master()
    assert before.version == "1.0.0"
    _fake_distribution(site, "1.0.1")  # "pip install" a new version
    with ClientLoad(server.host, server.port) as load:
        load.wait_for_progress(50)
        server.send_signal(signal.SIGUSR2)
        server.wait_for_log("upgraded in place to echod 1.0.1")
        wait_until(lambda: _new_generation(server, old, 2), 20, message="new workers")
        server.wait_for_log("generation 2 serving")
        load.wait_for_progress(load.report.attempted + 50)
    wait_until(lambda: _all_replaced(server, old, 2), 20, message="old generation gone")
    report = load.report
    print(f"USR2 under load: {report}")
    assert report.failed == 0, str(report)
    assert report.held_roundtrips > 0
    assert server.proc.poll() is None
    assert (runtime_dir / "echod.pid").read_text().strip() == str(server.pid)
    after = Scoreboard.attach(str(runtime_dir / "echod.scoreboard"), writable=False).master()
    assert after.pid == server.pid
    assert after.version == "1.0.1"
    assert after.code_started > before.code_started
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0


def test_usr2_with_failing_preflight_changes_nothing(start_echod, tmp_path: Path) -> None:
    server = start_echod(workers=2, config={"idle_timeout": 100})
    config_path = Path(server.argv[server.argv.index("-c") + 1])
    old = server.wait_workers(2)
    config_path.write_text("workers = 'many'\n")
    mark = server.mark()
    server.send_signal(signal.SIGUSR2)
    server.wait_for_log(
        r"upgrade aborted, everything keeps running as it was: .*workers", start=mark
    )
    assert server.worker_pids() == old
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"unchanged") == b"unchanged"


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_stop_after_upgrade_is_clean(start_echod, signum: int) -> None:
    server = start_echod(workers=1)
    server.send_signal(signal.SIGUSR2)
    server.wait_for_log("upgraded in place")
    server.wait_for_log("generation 2 serving")
    server.send_signal(signum)
    assert server.wait(20) == 0
