"""A package upgrade replaces echod's files under the running master (dpkg unpacks the
new version, then postinst runs `echoctl upgrade`). In that window nothing the old
master or its new children do may load a file from disk: a lazy import would mix
new code into the old process. Here every module of a private copy of echod is
replaced with one that fails on import while the master runs from that copy; the
master's everyday work (respawn, reload, scale, the metrics process) must go on,
the in-place upgrade's pre-flight must refuse the broken code, and once the files
are whole again the upgrade must succeed.
"""

from __future__ import annotations

import os
import shutil
import signal
import urllib.request
from pathlib import Path

import psutil
from support.echod import echo_roundtrip, wait_until
from support.paths import REPO

POISON_MESSAGE = "loaded a file replaced under the running master"
METRICS_LOG = r"serving metrics on http://(\S+)/metrics"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def _install_copy(lib: Path) -> None:
    shutil.copytree(
        REPO / "echod",
        lib / "echod",
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )


def _replace_every_module(package: Path) -> int:
    replaced = 0
    for cache in list(package.rglob("__pycache__")):
        shutil.rmtree(cache)
    for module in package.rglob("*.py"):
        module.write_text(f"raise ImportError({POISON_MESSAGE!r})\n")
        replaced += 1
    return replaced


def _metrics_child(master_pid: int) -> int | None:
    for child in psutil.Process(master_pid).children():
        try:
            if "echod: metrics" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def _scrape_openmetrics(address: str) -> str:
    request = urllib.request.Request(f"http://{address}/metrics", headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        return response.read().decode()


def _echoes(server, payload: bytes) -> bool:
    with server.connect() as sock:
        return echo_roundtrip(sock, payload) == payload


def test_the_master_loads_no_file_after_start(start_echod, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    _install_copy(lib)
    server = start_echod(
        workers=2, config={"metrics_bind": "127.0.0.1:0"}, env={"PYTHONPATH": str(lib)}
    )
    metrics_address = server.wait_for_log(METRICS_LOG).group(1)
    first = server.wait_workers(2)
    assert _replace_every_module(lib / "echod") > 50

    # a worker dies: the master forks a replacement
    os.kill(first[0], signal.SIGKILL)
    respawned = server.wait_workers(2, exclude={first[0]})
    assert _echoes(server, b"after a respawn")
    # reload: a whole new generation of workers
    server.send_signal(signal.SIGHUP)
    reloaded = server.wait_workers(2, timeout=30, exclude=set(respawned))
    assert _echoes(server, b"after a reload")
    # scale up
    server.send_signal(signal.SIGTTIN)
    server.wait_workers(3, timeout=30)
    # the metrics process dies: the master forks a new one, which still negotiates
    metrics = wait_until(lambda: _metrics_child(server.pid), 15, message="metrics process")
    os.kill(metrics, signal.SIGKILL)
    wait_until(
        lambda: (pid := _metrics_child(server.pid)) and pid != metrics,
        15,
        message="a new metrics process",
    )
    body = wait_until(lambda: _scrape_openmetrics(metrics_address), 15, message="a scrape")
    assert body.rstrip().endswith("# EOF")
    # an upgrade now runs the pre-flight on the broken files: refused, nothing changes
    mark = server.mark()
    server.send_signal(signal.SIGUSR2)
    aborted = server.wait_for_log(
        r"upgrade aborted, everything keeps running as it was.*", start=mark
    )
    assert POISON_MESSAGE in aborted.group(0)  # the pre-flight ran the copy: the test bites
    assert _echoes(server, b"after a refused upgrade")
    loaded = [line for line in server.lines if POISON_MESSAGE in line and "upgrade" not in line]
    assert not loaded, server.output
    assert set(reloaded) <= set(server.worker_pids())

    # the new files are whole (postinst time): the upgrade goes through, same pid
    _install_copy(lib)
    mark = server.mark()
    server.send_signal(signal.SIGUSR2)
    server.wait_for_log("upgraded in place", start=mark, timeout=30)
    server.wait_for_log("generation 3 serving", start=mark, timeout=30)
    assert _echoes(server, b"after the upgrade")
    assert server.proc.poll() is None
