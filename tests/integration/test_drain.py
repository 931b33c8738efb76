"""``echoctl drain`` / ``undrain``, ``reload_timeout`` and honest reloads, black-box:
the real echod, /readyz over HTTP, echoctl as a subprocess, echoes over sockets."""

from __future__ import annotations

import re
import selectors
import signal
import socket
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from support.echod import (
    assert_closed_by_server,
    echo_roundtrip,
    recv_until_eof,
    run_echoctl,
    status_json,
    to_toml,
    wait_until,
)

METRICS = re.compile(r"serving metrics on http://(\S+)/metrics")
CONFIG = {"metrics_bind": "127.0.0.1:0"}


def _endpoint(server) -> str:
    return server.wait_for_log(METRICS).group(1)


def _get(address: str, path: str) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        return recv_until_eof(sock, 10)


def _readyz(address: str) -> bytes:
    return _get(address, "/readyz")


def _wait_readyz(address: str, status: bytes) -> bytes:
    return wait_until(
        lambda: (r := _readyz(address)).startswith(b"HTTP/1.1 " + status) and r,
        15,
        message=f"/readyz {status.decode()}",
    )


def _gauge(address: str, name: str) -> float:
    text = _get(address, "/metrics").split(b"\r\n\r\n", 1)[1].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name} in the metrics")


def _ctl(runtime_dir: Path, *args: str | int):
    return run_echoctl("--runtime-dir", runtime_dir, *args)


def test_drain_turns_readyz_503_while_everything_serves(start_echod, runtime_dir) -> None:
    server = start_echod(workers=2, config=CONFIG)
    address = _endpoint(server)
    _wait_readyz(address, b"200")
    held = server.connect()
    try:
        assert echo_roundtrip(held, b"before") == b"before"
        drained = _ctl(runtime_dir, "drain")
        assert drained.returncode == 0, drained.stderr
        # the verb returns once the effect is visible: no wait needed here
        assert _readyz(address).endswith(b"not ready: draining (echoctl undrain)\n")
        assert _gauge(address, "echod_draining") == 1
        assert status_json(runtime_dir)["master"]["state"] == "draining"
        text = _ctl(runtime_dir, "status")
        assert "state: draining" in text.stdout
        assert _ctl(runtime_dir, "drain").returncode == 0  # again: harmless
        assert echo_roundtrip(held, b"old connection") == b"old connection"
        for _ in range(5):  # new connections are accepted and served as before
            with server.connect() as fresh:
                assert echo_roundtrip(fresh, b"new connection") == b"new connection"
        undrained = _ctl(runtime_dir, "undrain")
        assert undrained.returncode == 0, undrained.stderr
        assert _readyz(address).endswith(b"ready\n")
        assert _gauge(address, "echod_draining") == 0
        assert status_json(runtime_dir)["master"]["state"] == "serving"
        assert echo_roundtrip(held, b"after") == b"after"
    finally:
        held.close()
    server.wait_for_log(r"draining: /readyz answers 503")
    server.wait_for_log(r"drain ended: ready again")


def test_drain_holds_across_hup_and_usr2_and_not_across_a_restart(start_echod, runtime_dir) -> None:
    server = start_echod(workers=1, config=CONFIG)
    address = _endpoint(server)
    assert _ctl(runtime_dir, "drain").returncode == 0
    reloaded = _ctl(runtime_dir, "reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert _readyz(address).startswith(b"HTTP/1.1 503 ")
    upgraded = _ctl(runtime_dir, "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    # the new image serves: healthy, workers up, and still drained
    wait_until(
        lambda: status_json(runtime_dir)["master"]["state"] == "draining", 15, message="drained"
    )
    assert _readyz(address).endswith(b"not ready: draining (echoctl undrain)\n")
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"served") == b"served"
    assert _ctl(runtime_dir, "undrain").returncode == 0
    _wait_readyz(address, b"200")
    # a request left behind by a stopped instance does not drain the next one
    assert _ctl(runtime_dir, "drain").returncode == 0
    server.send_signal(signal.SIGQUIT)
    assert server.wait(30) == 0
    again = start_echod(workers=1, config=CONFIG)
    _wait_readyz(_endpoint(again), b"200")
    again.wait_for_log(r"removed the drain request")


def test_drain_without_a_master_exits_3(runtime_dir) -> None:
    for verb in ("drain", "undrain"):
        result = _ctl(runtime_dir, verb)
        assert result.returncode == 3, result
        assert "not running" in result.stderr


def _held(server, count: int = 1) -> list[socket.socket]:
    socks = []
    for number in range(count):
        sock = server.connect()
        assert echo_roundtrip(sock, b"hold %d" % number) == b"hold %d" % number
        socks.append(sock)
    return socks


def test_reload_timeout_outlives_graceful_timeout(start_echod, tmp_path) -> None:
    server = start_echod(workers=1, config={"graceful_timeout": 1, "reload_timeout": 4})
    (held,) = _held(server)
    try:
        retired = time.monotonic()
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"retiring the previous one")
        time.sleep(2.5)  # past graceful_timeout (1 s, +1 s of the master's grace)
        assert echo_roundtrip(held, b"still here") == b"still here"
        assert_closed_by_server(held, timeout=10)
        closed_after = time.monotonic() - retired
        assert 3.0 <= closed_after <= 10.0, closed_after
    finally:
        held.close()


def test_reload_timeout_zero_never_closes_and_a_stop_still_does(start_echod) -> None:
    server = start_echod(workers=1, config={"graceful_timeout": 1, "reload_timeout": 0})
    (held,) = _held(server)
    try:
        old = server.worker_pids()
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"retiring the previous one")
        time.sleep(3)
        assert echo_roundtrip(held, b"never forced") == b"never forced"
        assert set(old) <= set(server.worker_pids())  # the retired worker still serves it
        stopped = time.monotonic()
        server.send_signal(signal.SIGTERM)  # the stop's graceful_timeout holds for it
        assert_closed_by_server(held, timeout=10)
        assert server.wait(15) == 0
        assert time.monotonic() - stopped < 6
    finally:
        held.close()


def test_reload_reports_changes_and_restart_only_keys(start_echod, tmp_path) -> None:
    path = tmp_path / "reload.toml"
    base = {"metrics_bind": "127.0.0.1:0", "idle_timeout": 300}
    path.write_text(to_toml(base))
    server = start_echod("-c", str(path), workers=1)
    address = _endpoint(server)
    assert _gauge(address, "echod_config_last_reload_successful") == 1
    loaded = _gauge(address, "echod_config_last_reload_success_timestamp_seconds")
    assert abs(loaded - time.time()) < 120
    path.write_text(to_toml({**base, "idle_timeout": 42, "user": "nobody"}))
    mark = server.mark()
    time.sleep(1.1)  # a later timestamp, whole seconds apart
    assert _ctl(server.runtime_dir, "reload").returncode == 0
    changed = server.wait_for_log(r"reload: changed (.*)", start=mark).group(1)
    assert "idle_timeout 300.0 -> 42.0" in changed
    assert "user '' -> 'nobody'" in changed
    warning = server.wait_for_log(r"reload: (.*) only a restart applies", start=mark)
    assert warning.group(1).startswith("user changed")
    reloaded = _gauge(address, "echod_config_last_reload_success_timestamp_seconds")
    assert reloaded > loaded
    status = status_json(server.runtime_dir)["master"]
    assert status["config_last_reload_successful"] is True
    # a broken config: the gauge goes to 0, the timestamp stays the last good one
    path.write_text("idle_timeout = 'soon'\n")
    assert _ctl(server.runtime_dir, "reload").returncode == 1
    assert _gauge(address, "echod_config_last_reload_successful") == 0
    assert _gauge(address, "echod_config_last_reload_success_timestamp_seconds") == reloaded
    assert status_json(server.runtime_dir)["master"]["config_last_reload_successful"] is False
    with server.connect() as sock:  # the running configuration still serves
        assert echo_roundtrip(sock, b"fine") == b"fine"


def _close_times(socks: list[socket.socket], since: float, timeout: float) -> list[float]:
    """Seconds after `since` at which the server closed each socket (EOF or reset)."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    times: list[float] = []
    deadline = time.monotonic() + timeout
    while len(times) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                times.append(time.monotonic() - since)
                selector.unregister(sock)
    selector.close()
    assert len(times) == len(socks), f"only {len(times)} of {len(socks)} closed in {timeout}s"
    return sorted(times)


def _histogram(times: list[float], width: float = 0.5) -> str:
    buckets: dict[int, int] = {}
    for moment in times:
        buckets[int(moment / width)] = buckets.get(int(moment / width), 0) + 1
    return "\n".join(
        f"{k * width:5.1f}-{(k + 1) * width:4.1f}s {n:4d} {'#' * (n // 2)}"
        for k, n in sorted(buckets.items())
    )


def _most_within(times: list[float], window: float) -> int:
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def _retire_held(start_echod, spread: float, count: int = 200) -> list[float]:
    config = {"graceful_timeout": 30, "reload_timeout": 6, "close_spread": spread}
    server = start_echod(workers=1, config=config)
    socks = _held(server, count)
    try:
        retired = time.monotonic()
        server.send_signal(signal.SIGHUP)
        times = _close_times(socks, retired, timeout=30)
    finally:
        for sock in socks:
            sock.close()
    print(f"close_spread = {spread}: {count} held connections closed at\n{_histogram(times)}")
    return times


def test_close_spread_spreads_the_closes_of_a_retired_worker(start_echod) -> None:
    times = _retire_held(start_echod, spread=4)
    # the window ends at reload_timeout (6 s): closes from about 2 s to 6 s
    assert times[-1] - times[0] >= 3.0, times
    # An even spread over 4 s puts exactly a quarter in any 1 s window; the client's
    # view adds the scheduling jitter of a busy machine: a fifth of that on top
    assert _most_within(times, 1.0) <= 200 // 4 * 1.2, _histogram(times)
    assert times[-1] < 6 + 3  # and the limit stays the limit (a busy machine's slack)


def test_without_close_spread_they_close_together(start_echod) -> None:
    times = _retire_held(start_echod, spread=0)
    assert times[0] >= 5.0  # nothing before reload_timeout
    assert _most_within(times, 1.0) >= 190, _histogram(times)


def test_close_spread_on_a_stop_ends_within_graceful_timeout(start_echod) -> None:
    server = start_echod(workers=1, config={"graceful_timeout": 3, "close_spread": 2})
    socks = _held(server, 100)
    try:
        stopped = time.monotonic()
        server.send_signal(signal.SIGTERM)
        times = _close_times(socks, stopped, timeout=20)
        assert server.wait(20) == 0
        exited = time.monotonic() - stopped
    finally:
        for sock in socks:
            sock.close()
    print(f"stop, graceful_timeout 3, close_spread 2:\n{_histogram(times)}")
    assert times[0] >= 0.8  # the window is the last 2 s of the 3
    assert times[-1] - times[0] >= 1.2
    assert exited < 3 + 3  # the stop's total stays graceful_timeout (+ slack)
