"""The Prometheus endpoint: valid exposition, values that move with traffic and never go
backwards across worker deaths, reload/restart events, HTTP hygiene and its process."""

from __future__ import annotations

import re
import select
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.echod import echo_roundtrip, recv_until_eof, wait_until

from echod.scoreboard import NUM_COUNTERS, Counter, Scoreboard, WorkerSlot

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
METRICS = re.compile(r"serving metrics on http://(\S+)/metrics")
CONFIG = {"metrics_bind": "127.0.0.1:0"}
# totals that must never decrease while echod runs, whatever happens to workers
MONOTONIC = [
    ("echod_connections_total", {}),
    ("echod_bytes_received_total", {"transport": "stream"}),
    ("echod_bytes_sent_total", {"transport": "stream"}),
    ("echod_connections_closed_total", {"reason": "client_eof"}),
    ("echod_worker_restarts_total", {"reason": "crashed"}),
    ("echod_reloads_total", {"result": "ok"}),
]


def _endpoint(server) -> str:
    return server.wait_for_log(METRICS).group(1)


def _scrape_text(address: str, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def scrape(address: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(_scrape_text(address)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class MonotonicWatch:
    """Scrapes, remembering each total, and fails if one ever goes down."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.last: dict[str, float] = {}
        self.scrapes = 0

    def scrape(self) -> Samples:
        samples = scrape(self.address)
        self.scrapes += 1
        for name, labels in MONOTONIC:
            key = f"{name}{labels}"
            current = value(samples, name, **labels)
            previous = self.last.get(key, 0)
            assert current >= previous, f"{key} went from {previous} to {current}"
            self.last[key] = current
        return samples

    def until(
        self, predicate: Callable[[Samples], bool], message: str, timeout: float = 15.0
    ) -> Samples:
        def satisfied() -> Samples | None:
            samples = self.scrape()
            return samples if predicate(samples) else None

        return wait_until(satisfied, timeout, interval=0.05, message=message)


class Load:
    """Echo traffic from a background thread: short connections, checked byte for byte."""

    def __init__(self, server, payload: bytes = b"L" * 1000) -> None:
        self.server = server
        self.payload = payload
        self.done = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.server.connect(timeout=5) as sock:
                    if echo_roundtrip(sock, self.payload, timeout=5) == self.payload:
                        self.done += 1
            except (OSError, AssertionError):
                pass  # a connection on the worker we killed: expected

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(15)


def test_exposition_is_valid_with_help_and_type(start_echod) -> None:
    server = start_echod(workers=2, config=CONFIG)
    text = _scrape_text(_endpoint(server))
    families = {family.name: family for family in text_string_to_metric_families(text)}
    helps = set(re.findall(r"^# HELP (\S+) \S", text, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (counter|gauge)$", text, re.M))
    assert helps == set(types), helps ^ set(types)
    for name in (
        "echod_build_info",
        "echod_workers",
        "echod_worker_restarts",
        "echod_connections_active",
        "echod_connections",
        "echod_connections_rejected",
        "echod_bytes_received",
        "echod_bytes_sent",
        "echod_accept_errors",
        "echod_udp_datagrams",
        "echod_reloads",
        "echod_connections_closed",
        "echod_worker_connections_active",
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "echod_worker_cpu_seconds",
        "echod_worker_resident_memory_bytes",
    ):
        assert name in families, name
    samples = scrape(_endpoint(server))
    assert value(samples, "echod_workers", state="ready") == 2
    build = [labels for (name, labels) in samples if name == "echod_build_info"]
    assert dict(build[0])["version"]
    assert value(samples, "process_resident_memory_bytes") > 0
    assert {
        dict(labels)["worker"]
        for (name, labels) in samples
        if name == "echod_worker_connections_active"
    } == {"1", "2"}


def test_totals_move_with_traffic_and_survive_a_killed_worker(start_echod) -> None:
    server = start_echod(workers=2, config=CONFIG)
    watch = MonotonicWatch(_endpoint(server))
    before = watch.scrape()
    assert value(before, "echod_connections_total") == 0
    for index in range(20):
        with server.connect() as sock:
            assert echo_roundtrip(sock, bytes([index]) * 1000) == bytes([index]) * 1000
    watch.until(
        lambda s: (
            value(s, "echod_connections_total") >= 20
            and value(s, "echod_bytes_received_total", transport="stream") >= 20_000
            and value(s, "echod_bytes_sent_total", transport="stream") >= 20_000
            and value(s, "echod_connections_closed_total", reason="client_eof") >= 20
        ),
        "the first 20 connections to be counted",
    )
    victim = server.wait_workers(2)[0]
    with Load(server) as load:
        wait_until(lambda: load.done >= 20, 15, message="load to flow")
        for _ in range(5):
            watch.scrape()
        psutil.Process(victim).kill()
        after = watch.until(
            lambda s: (
                value(s, "echod_worker_restarts_total", reason="crashed") == 1
                and value(s, "echod_workers", state="ready") == 2
            ),
            "restarts_total{crashed} after SIGKILL",
        )
        done_at_kill = load.done
        wait_until(lambda: load.done >= done_at_kill + 20, 15, message="load after the kill")
        for _ in range(5):
            watch.scrape()
    assert victim not in server.wait_workers(2)
    # A SIGKILLed worker takes its last unpublished heartbeat's worth of counts with it;
    # everything published before, and everything after the restart, is in the totals.
    after_restart = load.done - done_at_kill
    final = watch.until(
        lambda s: value(s, "echod_connections_total") >= 20 + after_restart,
        "the load's connections to be counted",
    )
    assert value(final, "echod_bytes_sent_total", transport="stream") >= 1000 * (20 + after_restart)
    assert value(after, "echod_worker_restarts_total", reason="timeout") == 0
    assert watch.scrapes >= 12


def test_reload_and_worker_counts(start_echod) -> None:
    server = start_echod(workers=2, config=CONFIG)
    address = _endpoint(server)
    watch = MonotonicWatch(address)
    clients = [server.connect() for _ in range(3)]
    try:
        for sock in clients:
            assert echo_roundtrip(sock, b"held") == b"held"
        watch.until(
            lambda s: (
                value(s, "echod_connections_active") == 3
                and sum(v for (n, _), v in s.items() if n == "echod_worker_connections_active") == 3
            ),
            "3 active connections",
        )
    finally:
        for sock in clients:
            sock.close()
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"generation \d+ serving", start=mark)
    samples = watch.until(
        lambda s: (
            value(s, "echod_reloads_total", result="ok") == 1
            and value(s, "echod_generation") == 2
            and value(s, "echod_workers", state="ready") == 2
            and value(s, "echod_workers", state="draining") == 0
        ),
        "reloads_total{ok} and generation 2 after HUP",
    )
    generations = {
        dict(labels)["generation"] for (name, labels) in samples if name == "echod_worker_info"
    }
    assert generations == {"2"}
    # the old workers published their last counts on the way out and the master kept them
    assert value(samples, "echod_connections_total") == 3
    assert value(samples, "echod_connections_closed_total", reason="client_eof") == 3
    # the endpoint kept its socket across the reload
    assert _endpoint(server) == address


def test_udp_datagrams_are_counted(start_echod) -> None:
    server = start_echod(bind=["127.0.0.1:0", "udp://127.0.0.1:0"], config=CONFIG)
    udp_port = next(int(a.rsplit(":", 1)[1]) for a in server.addresses if a.startswith("udp://"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for index in range(5):
            sock.sendto(b"datagram %d" % index, ("127.0.0.1", udp_port))
            assert sock.recvfrom(100)[0] == b"datagram %d" % index
    samples = MonotonicWatch(_endpoint(server)).until(
        lambda s: value(s, "echod_udp_datagrams_total", result="echoed") == 5, "5 echoed datagrams"
    )
    assert value(samples, "echod_udp_datagrams_received_total") == 5
    assert value(samples, "echod_bytes_received_total", transport="udp") == 5 * len(b"datagram 0")


def test_fold_moves_a_slot_into_the_retired_totals_in_one_step(tmp_path) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    board.claim(0, pid=123, generation=1, worker_id=1)
    counters = [0] * NUM_COUNTERS
    counters[Counter.ACCEPTED] = 7
    counters[Counter.BYTES_IN] = 700
    WorkerSlot(board, 0).publish(0.0, 2, counters)
    reader = Scoreboard.attach(board.path, writable=False)

    def total(which: Counter) -> int:
        return reader.snapshot().totals()[which]

    assert total(Counter.ACCEPTED) == 7
    board.fold_into_retired(0)
    assert total(Counter.ACCEPTED) == 7 and total(Counter.BYTES_IN) == 700
    board.release(0)
    assert total(Counter.ACCEPTED) == 7
    board.claim(0, pid=124, generation=1, worker_id=1)  # the replacement starts from zero
    counters[Counter.ACCEPTED] = 1
    WorkerSlot(board, 0).publish(0.0, 1, counters)
    assert total(Counter.ACCEPTED) == 8
    reader.close()
    board.close()


def _raw_request(address: str, request: bytes, timeout: float = 10) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        if request:
            sock.sendall(request)
        return recv_until_eof(sock, timeout)


def test_http_hygiene(start_echod) -> None:
    server = start_echod(config=CONFIG)
    address = _endpoint(server)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{address}/", timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as post:
        urllib.request.urlopen(f"http://{address}/metrics", data=b"x=1", timeout=10)
    assert post.value.code == 405
    assert _raw_request(address, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    too_big = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 20_000 + b"\r\n\r\n"
    assert _raw_request(address, too_big).startswith(b"HTTP/1.1 431 ")
    http10 = _raw_request(address, b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n")
    assert http10.startswith(b"HTTP/1.1 200 OK\r\n") and b"echod_build_info" in http10
    head = _raw_request(address, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    # a client that says nothing is answered 408 and closed (CLIENT_TIMEOUT, 5 s)
    assert _raw_request(address, b"", timeout=15).startswith(b"HTTP/1.1 408 ")
    # many idle clients at once do not stop a scrape for long
    idle = [socket.create_connection(tuple_of(address), timeout=10) for _ in range(40)]
    try:
        assert "echod_build_info" in _scrape_text(address)
    finally:
        for sock in idle:
            sock.close()


def tuple_of(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def test_metrics_port_in_use_fails_start_with_69(start_echod) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = start_echod(config={"metrics_bind": f"127.0.0.1:{port}"}, wait=False)
        assert server.wait(15) == 69
    assert "address already in use" in server.output
    assert f"127.0.0.1:{port}" in server.output
    assert len(server.lines) <= 2


def test_metrics_bind_must_be_tcp(start_echod, tmp_path) -> None:
    server = start_echod("--check-config", config={"metrics_bind": "unix:/tmp/x"}, wait=False)
    assert server.wait(15) == 78
    assert "metrics_bind" in server.output


def _metrics_process(server) -> psutil.Process | None:
    """The live metrics process, if exactly one."""
    found = []
    for child in psutil.Process(server.pid).children():
        try:
            if "echod: metrics" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass  # a zombie (just killed) or gone
    return found[0] if len(found) == 1 else None


def test_metrics_process_is_restarted_and_dies_with_the_master(start_echod) -> None:
    server = start_echod(workers=1, config=CONFIG)
    address = _endpoint(server)
    first = wait_until(lambda: _metrics_process(server), 10, message="the metrics process")
    workers = server.wait_workers(1)  # the metrics process is not counted as a worker
    first.kill()
    second = wait_until(
        lambda: (p := _metrics_process(server)) and p.pid != first.pid and p,
        10,
        message="a new metrics process",
    )
    assert "echod_build_info" in _scrape_text(address)
    assert server.wait_workers(1) == workers  # workers were not touched
    server.wait_for_log(rf"metrics process \(pid {first.pid}\) was killed by SIGKILL")
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    _, alive = psutil.wait_procs([second], timeout=5)
    assert not alive, "the metrics process outlived the master"


def test_graceful_stop_ends_the_metrics_process(start_echod) -> None:
    server = start_echod(config=CONFIG)
    metrics = wait_until(lambda: _metrics_process(server), 10, message="the metrics process")
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    _, alive = psutil.wait_procs([metrics], timeout=5)
    assert not alive


def test_reload_moves_turns_on_and_keeps_the_endpoint(start_echod, tmp_path) -> None:
    server = start_echod(config={})  # metrics off
    assert METRICS.search(server.output) is None
    config = next(tmp_path.glob("echod-*.toml"))
    config.write_text('metrics_bind = "127.0.0.1:0"\n')
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    first = server.wait_for_log(METRICS, start=mark).group(1)
    assert "echod_build_info" in _scrape_text(first)
    with socket.socket() as taken:  # a reload to a taken port keeps the old endpoint
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config.write_text(f'metrics_bind = "127.0.0.1:{taken.getsockname()[1]}"\n')
        mark = server.mark()
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"address already in use; metrics stay on 127\.0\.0\.1:0", start=mark)
        server.wait_for_log(r"generation \d+ serving", start=mark)
        assert "echod_build_info" in _scrape_text(first)
    config.write_text("")
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log("metrics endpoint turned off", start=mark)
    wait_until(
        lambda: _metrics_process(server) is None and not _connectable(first),
        10,
        message="the endpoint to go away",
    )


def _connectable(address: str) -> bool:
    try:
        socket.create_connection(tuple_of(address), timeout=2).close()
    except OSError:
        return False
    return True


def test_out_of_descriptors_is_counted_and_logged_once(start_echod) -> None:
    server = start_echod(workers=1, config=CONFIG, nofile=48)
    watch = MonotonicWatch(_endpoint(server))
    clients = []
    try:
        for _ in range(60):  # more than the worker can hold: accept keeps failing, pausing
            clients.append(socket.create_connection((server.host, server.port), timeout=5))
        samples = watch.until(
            lambda s: value(s, "echod_accept_errors_total", errno="EMFILE") >= 3,
            "three EMFILE pauses",
            timeout=8,
        )
        assert value(samples, "echod_accept_paused_total", reason="out_of_descriptors") >= 3
        # three or more occurrences within the 10 s window: a single log line
        assert server.output.count("out of file descriptors") == 1, server.output
    finally:
        for sock in clients:
            sock.close()


def test_metrics_endpoint_survives_an_in_place_upgrade(start_echod) -> None:
    server = start_echod(workers=1, config={"metrics_bind": "127.0.0.1:0"})
    address = server.wait_for_log(METRICS).group(1)
    before = _scrape_text(address)
    assert 'echod_upgrades_total{result="ok"} 0' in before
    mark = server.mark()
    server.send_signal(signal.SIGUSR2)
    server.wait_for_log(r"generation \d+ serving", start=mark)

    def upgraded() -> bool:
        try:
            return 'echod_upgrades_total{result="ok"} 1' in _scrape_text(address)
        except OSError:
            return False  # the new image's metrics process is starting

    wait_until(upgraded, 15, message="the upgraded master's metrics on the same socket")
    assert _metrics_process(server) is not None, "the old image's metrics process must be gone"


def test_rejections_and_udp_drops_are_counted_by_reason(start_echod) -> None:
    config = {
        **CONFIG,
        "max_connections_per_ip": 1,
        "udp_rate_per_source": 1,
        "udp_burst_per_source": 1,
    }
    server = start_echod(bind=["127.0.0.1:0", "udp://127.0.0.1:0"], workers=2, config=config)
    udp_port = next(int(a.rsplit(":", 1)[1]) for a in server.addresses if a.startswith("udp://"))
    with server.connect() as held:
        echo_roundtrip(held, b"first")  # the one connection this address may hold
        try:  # closed at once: over the per-IP limit
            with server.connect() as extra:
                assert recv_until_eof(extra) == b""
        except ConnectionResetError:
            pass  # the reset can beat connect() itself on loopback
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(20):  # the burst of 1 lets one through, the rest are over rate
            sock.sendto(b"flood", ("127.0.0.1", udp_port))
    samples = MonotonicWatch(_endpoint(server)).until(
        lambda s: (
            value(s, "echod_udp_datagrams_received_total") == 20
            # published on the rejecting worker's next heartbeat, not at once
            and value(s, "echod_connections_rejected_total", reason="per_ip_limit") >= 1
        ),
        "20 received datagrams and the rejection",
    )
    assert value(samples, "echod_connections_rejected_total", reason="per_ip_limit") == 1
    echoed = value(samples, "echod_udp_datagrams_total", result="echoed")
    dropped = value(samples, "echod_udp_datagrams_total", result="dropped_rate_limit")
    assert echoed >= 1 and dropped >= 15 and echoed + dropped == 20


def _trickled_request(address: str, request: bytes, piece: int) -> bytes:
    with socket.create_connection(tuple_of(address), timeout=10) as sock:
        for start in range(0, len(request), piece):
            try:
                sock.sendall(request[start : start + piece])
            except OSError:
                break  # answered and closed before the rest: fine
        return recv_until_eof(sock, 10)


def test_size_limit_does_not_depend_on_how_bytes_arrive_and_absolute_form(start_echod) -> None:
    server = start_echod(config=CONFIG)
    address = _endpoint(server)
    one_write = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 12_000 + b"\r\n\r\n"
    assert _raw_request(address, one_write).startswith(b"HTTP/1.1 431 ")
    trickled = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 10_000 + b"\r\n\r\n"
    assert _trickled_request(address, trickled, 1000).startswith(b"HTTP/1.1 431 ")
    absolute = _raw_request(address, f"GET http://{address}/metrics HTTP/1.1\r\n\r\n".encode())
    assert absolute.startswith(b"HTTP/1.1 200 OK\r\n") and b"echod_build_info" in absolute
    assert b'echod_proxy_headers_total{result="malformed"} 0' in absolute


def test_a_trickled_head_has_one_deadline_not_one_per_read(start_echod) -> None:
    # A byte every 0.5 s keeps each recv() inside any per-read timeout; the whole
    # head still gets CLIENT_TIMEOUT (5 s): 408, long before the 40 bytes are sent.
    address = _endpoint(start_echod(config=CONFIG))
    with socket.create_connection(tuple_of(address), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        for _ in range(40):
            if select.select([sock], [], [], 0.5)[0]:
                break  # answered
            try:
                sock.sendall(b"a")
            except OSError:
                break  # answered and closed: read it below
        assert recv_until_eof(sock, 10).startswith(b"HTTP/1.1 408 ")


def test_request_line_edges_and_one_request_per_connection(start_echod) -> None:
    address = _endpoint(start_echod(config=CONFIG))

    def status(request: bytes) -> bytes:
        return _raw_request(address, request).split(b"\r\n", 1)[0]

    # every answer has a status line: HTTP/0.9 and blank request lines are 400
    assert status(b"GET /metrics\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
    assert status(b"\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
    assert status(b"GET /metrics HTTP/2.0\r\n\r\n") == b"HTTP/1.1 505 HTTP Version Not Supported"
    assert status(b"BREW /metrics HTTP/1.1\r\n\r\n") == b"HTTP/1.1 501 Not Implemented"
    assert status(b"POST /nowhere HTTP/1.1\r\n\r\n") == b"HTTP/1.1 404 Not Found"
    options = _raw_request(address, b"OPTIONS /metrics HTTP/1.1\r\n\r\n")
    assert options.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET, HEAD\r\n" in options
    # just under the 8 KiB head budget is fine
    near = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 7_000 + b"\r\n\r\n"
    assert status(near) == b"HTTP/1.1 200 OK"
    # keep-alive asked for, and a second request pipelined: one answer, then close
    two = b"GET /healthz HTTP/1.1\r\nConnection: keep-alive\r\n\r\n" * 2
    answer = _raw_request(address, two)
    assert answer.count(b"HTTP/1.1 ") == 1 and b"\r\nConnection: close\r\n" in answer
    assert b"\r\nServer: echod\r\n" in answer


def test_healthz_and_readyz(start_echod) -> None:
    server = start_echod(workers=1, config=CONFIG)
    address = _endpoint(server)
    server.wait_workers(1)
    assert _raw_request(address, b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\nok\n")
    ready = wait_until(
        lambda: (
            (r := _raw_request(address, b"GET /readyz HTTP/1.1\r\n\r\n")).startswith(
                b"HTTP/1.1 200 "
            )
            and r
        ),
        10,
        message="/readyz 200",
    )
    assert ready.endswith(b"\r\n\r\nready\n")
    server.send_signal(signal.SIGSTOP)
    try:
        stale = wait_until(
            lambda: (
                (r := _raw_request(address, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(
                    b"HTTP/1.1 503 "
                )
                and r
            ),
            20,
            interval=0.5,
            message="/healthz 503 with the master stopped",
        )
    finally:
        server.send_signal(signal.SIGCONT)
    assert stale.endswith(b"heartbeat stale\n")


def test_readyz_turns_503_once_a_termed_echod_stops(start_echod) -> None:
    server = start_echod(workers=1, config={**CONFIG, "graceful_timeout": 60})
    address = _endpoint(server)
    held = server.connect()  # keeps the master alive in STOPPING
    try:
        assert echo_roundtrip(held, b"held") == b"held"
        wait_until(
            lambda: _raw_request(address, b"GET /readyz HTTP/1.1\r\n\r\n").startswith(
                b"HTTP/1.1 200 "
            ),
            10,
            message="/readyz 200",
        )
        server.send_signal(signal.SIGTERM)
        stopping = wait_until(
            lambda: (
                (r := _raw_request(address, b"GET /readyz HTTP/1.1\r\n\r\n")).startswith(
                    b"HTTP/1.1 503 "
                )
                and r
            ),
            10,
            message="/readyz 503 after TERM",
        )
        assert stopping.endswith(b"not ready: shutting down\n")
    finally:
        held.close()
    assert server.wait(30) == 0


def test_promtool_accepts_the_exposition(start_echod) -> None:
    # CI installs Debian's prometheus package: a missing promtool fails, never skips
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool not installed (Debian package prometheus)"
    server = start_echod(workers=2, config=CONFIG)
    text = _scrape_text(_endpoint(server))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _get(address: str, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(f"http://{address}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return {k.lower(): v for k, v in response.headers.items()}, response.read()


def test_format_follows_the_scrapers_accept_and_gzip_when_asked(start_echod) -> None:
    import gzip

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    address = _endpoint(start_echod(config=CONFIG))
    # Prometheus 2.x asks for OpenMetrics first: it gets it, # EOF and all
    headers, body = _get(
        address,
        {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"},
    )
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    names = {family.name for family in om_parse(body.decode())}
    assert {"echod_connections", "echod_build_info", "process_cpu_seconds"} <= names
    # the classic text format for everyone else, even a newer text/plain version
    for accept in ("", "text/plain", "text/plain;version=1.0.0", "*/*"):
        headers, body = _get(address, {"Accept": accept} if accept else {})
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8", accept
        assert b"# EOF" not in body and b"# TYPE echod_connections_total counter" in body
        assert "content-encoding" not in headers
    # gzip only when the scraper allows it; same content either way
    headers, body = _get(address, {"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip" and "Accept-Encoding" in headers["vary"]
    assert b"# TYPE echod_connections_total counter" in gzip.decompress(body)
    headers, _ = _get(address, {"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in headers


def test_no_created_samples_and_no_library_default_collectors(start_echod) -> None:
    text = _scrape_text(_endpoint(start_echod(config=CONFIG)))
    assert "_created" not in text  # they would double every counter's series
    # process_* describe the master, once; no python_gc_* / python_info from the library
    assert text.count("# TYPE process_cpu_seconds_total counter") == 1
    assert "python_gc_" not in text and "python_info" not in text


def test_a_hundred_parallel_scrapes_all_succeed(start_echod) -> None:
    address = _endpoint(start_echod(workers=2, config=CONFIG))
    results: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(_scrape_text(address))
        except BaseException as error:  # collected, asserted below
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    assert len(results) == 100 and all("echod_build_info" in text for text in results)
