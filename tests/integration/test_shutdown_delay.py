"""shutdown_delay: after TERM, echod is not ready (/readyz 503, scoreboard status)
but keeps accepting and serving for the delay, then stops gracefully; INT skips it."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.echod import EchodProcess, echo_roundtrip, run_echoctl, wait_until

from echod.scoreboard import MasterStatus, Scoreboard, scoreboard_path

METRICS = re.compile(r"serving metrics on http://(\S+)/metrics")
DELAY = 4.0


def readyz(address: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def master_status(server: EchodProcess) -> MasterStatus:
    board = Scoreboard.attach(scoreboard_path(str(server.runtime_dir / "echod.pid")), False)
    try:
        return board.master().status
    finally:
        board.close()


def test_term_keeps_serving_not_ready_for_the_delay_then_stops(start_echod) -> None:
    config = {"metrics_bind": "127.0.0.1:0", "shutdown_delay": DELAY, "graceful_timeout": 10}
    server = start_echod(workers=2, config=config)
    address = server.wait_for_log(METRICS).group(1)
    wait_until(lambda: readyz(address)[0] == 200, 10, message="/readyz 200 before TERM")
    termed = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert wait_until(lambda: readyz(address)[0] == 503, 5, message="/readyz 503 after TERM")
    assert readyz(address)[1] == "not ready: shutting down\n"
    assert master_status(server) is MasterStatus.SHUTTING_DOWN
    server.wait_for_log(re.compile(r"shutting down: not ready, still serving for 4 s"))
    # New clients are still accepted and served during the delay.
    served = 0
    while time.monotonic() - termed < DELAY / 2 and served < 20:
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"still here %d" % served) == b"still here %d" % served
        served += 1
    assert served >= 1
    assert server.wait(DELAY + 30) == 0
    assert time.monotonic() - termed >= DELAY - 0.5  # the delay was honoured
    with socket.socket() as probe:  # and the port is free again
        probe.bind(("127.0.0.1", server.port))


def test_int_during_the_delay_stops_at_once(start_echod) -> None:
    server = start_echod(workers=1, config={"shutdown_delay": 120})
    server.send_signal(signal.SIGTERM)
    wait_until(lambda: master_status(server) is MasterStatus.SHUTTING_DOWN, 10)
    server.send_signal(signal.SIGINT)
    assert server.wait(30) == 0  # far less than the 120 s delay


def test_term_abandons_a_running_upgrade_and_exits_after_the_delay(
    start_echod, tmp_path: Path
) -> None:
    # A pre-flight slow enough to be running when TERM arrives: without the fix it
    # would pass during the delay and re-execute the master, losing the TERM.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys, time\nif '--check-config' in sys.argv:\n    time.sleep(3)\n"
    )
    config = {"shutdown_delay": DELAY}
    server = start_echod(workers=1, config=config, env={"PYTHONPATH": str(site)})
    server.send_signal(signal.SIGUSR2)
    server.wait_for_log("upgrade requested")
    termed = time.monotonic()
    server.send_signal(signal.SIGTERM)
    server.wait_for_log("upgrade abandoned: echod is stopping")
    assert server.wait(DELAY + 30) == 0
    assert time.monotonic() - termed >= DELAY - 0.5
    assert "upgraded in place" not in server.output
    assert "re-executing in place" not in server.output
    with pytest.raises(ProcessLookupError):  # the same pid was not re-used by a new master
        os.kill(server.pid, 0)


def test_echoctl_stop_does_not_count_the_delay_against_its_timeout(
    start_echod, runtime_dir: Path
) -> None:
    server = start_echod(workers=1, config={"shutdown_delay": 12})
    started = time.monotonic()
    result = run_echoctl("stop", "--timeout", "8", "--runtime-dir", str(runtime_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "waiting for the shutdown delay" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, not one per poll
    assert time.monotonic() - started >= 11  # it did wait for the delay
    assert server.proc.poll() == 0
