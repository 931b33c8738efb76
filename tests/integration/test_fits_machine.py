"""echod sizes itself to the machine it lands on (SPEC, "Fits the machine it lands on").

Real kernel facts, no mocks: CPU affinity, a throw-away cgroup v1 with a CPU
quota, open-file limits, and a real OOM kill in a memory cgroup. The cgroup
logic over v2 and odd trees is unit-tested in tests/unit/test_cgroups.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.cgroups import Cgroup
from support.echod import echo_roundtrip, wait_until

METRICS = re.compile(r"serving metrics on http://(\S+)/metrics")


@pytest.fixture
def cgroups() -> Iterator[Callable[[str], Cgroup]]:
    made: list[Cgroup] = []

    def make(controller: str) -> Cgroup:
        made.append(Cgroup(controller))
        return made[-1]

    yield make
    for cgroup in made:
        cgroup.remove()


def metric(server, name: str, **labels: str) -> float:
    address = server.wait_for_log(METRICS).group(1)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


# -- workers ------------------------------------------------------------------------
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to restrict")
def test_workers_unset_follow_the_cpu_affinity(start_echod) -> None:
    server = start_echod(workers=0, preexec=lambda: os.sched_setaffinity(0, {0}))
    server.wait_for_log(r"1 worker\(s\): CPU affinity allows 1 of \d+ CPU\(s\)")
    assert len(server.wait_workers(1)) == 1


def test_an_explicit_worker_count_wins_over_the_affinity(start_echod) -> None:
    server = start_echod(workers=2, preexec=lambda: os.sched_setaffinity(0, {0}))
    server.wait_for_log(r"2 worker\(s\): workers = 2 in the configuration")
    assert len(server.wait_workers(2)) == 2


def test_workers_unset_follow_the_cgroup_cpu_quota_and_hup_re_resolves(
    start_echod, cgroups
) -> None:
    cpu = cgroups("cpu")
    cpu.write("cpu.cfs_period_us", 100000)
    cpu.write("cpu.cfs_quota_us", 100000)  # one CPU's worth
    server = start_echod(workers=0, preexec=cpu.enter)
    server.wait_for_log(rf"1 worker\(s\): 1 CPU\(s\) of quota in {re.escape(str(cpu.path))}")
    first = server.wait_workers(1)
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"quota") == b"quota"
    # the quota changes (a pod resized in place): a reload sizes again
    cpu.write("cpu.cfs_quota_us", 50000)  # half a CPU: still at least one worker
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"1 worker\(s\): 0.5 CPU\(s\) of quota", start=mark)
    assert server.wait_workers(1, exclude=set(first))
    if len(os.sched_getaffinity(0)) >= 2:
        cpu.write("cpu.cfs_quota_us", -1)  # the quota lifted: every CPU allowed
        mark = server.mark()
        server.send_signal(signal.SIGHUP)
        cpus = len(os.sched_getaffinity(0))
        server.wait_for_log(rf"{cpus} worker\(s\): ", start=mark)
        server.wait_workers(cpus)


# -- descriptors --------------------------------------------------------------------
CLIENTS = 2500


def _enough_descriptors_here(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            pytest.skip(f"the test itself needs {count} descriptors (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def test_a_soft_limit_of_1024_is_raised_and_one_worker_serves_2500_clients(start_echod) -> None:
    _enough_descriptors_here(CLIENTS + 200)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # raising it needs a capability
    hard = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    server = start_echod(workers=1, nofile=(1024, hard), config={"metrics_bind": "127.0.0.1:0"})
    raised = server.wait_for_log(
        r"raised the open-file soft limit \(RLIMIT_NOFILE\) from 1024 to (\d+)"
    )
    limit = int(raised.group(1))
    assert limit == hard or 10000 < limit < hard  # max_connections 10000 + its own, or all
    assert metric(server, "process_max_fds") == limit  # the metrics show the raised one
    clients: list[socket.socket] = []
    try:
        for _ in range(CLIENTS):
            clients.append(server.connect())
        for number, sock in enumerate(clients):  # all open at once, each one served
            payload = f"client {number}\n".encode()
            assert echo_roundtrip(sock, payload) == payload
        assert len(clients) == CLIENTS
    finally:
        for sock in clients:
            sock.close()
    assert "out of file descriptors" not in server.output
    assert "too low for max_connections" not in server.output


def test_a_hard_limit_of_1024_is_warned_about_once_with_both_numbers(start_echod) -> None:
    server = start_echod(workers=1, nofile=1024)
    warning = server.wait_for_log(
        r"WARNING.*hard limit \(RLIMIT_NOFILE\) 1024 is too low for max_connections 10000 "
        r"\(a worker needs \d+\): each worker holds at most (\d+) connection"
    )
    assert 900 < int(warning.group(1)) < 1024
    server.send_signal(signal.SIGHUP)  # a reload with the same max_connections: no repeat
    server.wait_for_log(r"generation 2 serving")
    assert server.output.count("too low for max_connections") == 1


# -- the OOM killer -----------------------------------------------------------------
def _oom_score_adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as handle:
        return int(handle.read())


def _read_kills(memory: Cgroup) -> int:
    for line in memory.read("memory.oom_control").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    raise AssertionError("no oom_kill in memory.oom_control")


def test_an_oom_killed_worker_is_told_counted_and_replaced(start_echod, cgroups) -> None:
    memory = cgroups("memory")
    memory.write("memory.swappiness", 0)  # no swapping out of it: the OOM killer acts
    server = start_echod(
        workers=1,
        preexec=memory.enter,
        config={"metrics_bind": "127.0.0.1:0", "max_buffer": 32 << 20},
    )
    (worker,) = server.wait_workers(1)
    metric(server, "echod_worker_restarts_total", reason="oom")  # the metrics process runs
    assert _oom_score_adj(worker) > _oom_score_adj(server.pid)
    footprint = int(memory.read("memory.usage_in_bytes"))
    memory.write("memory.limit_in_bytes", footprint + (48 << 20))  # a little above echod
    assert _read_kills(memory) == 0
    # clients that send and never read: the worker holds up to max_buffer for each
    hogs: list[socket.socket] = []
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(8):
            sock = server.connect()
            sock.setblocking(False)
            hogs.append(sock)
        deadline = time.monotonic() + 60
        while _read_kills(memory) == 0 and time.monotonic() < deadline:
            for sock in hogs:
                with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                    sock.send(chunk)
            time.sleep(0.01)
        assert _read_kills(memory) >= 1, "the kernel counted no OOM kill"
    finally:
        for sock in hogs:
            sock.close()
    line = server.wait_for_log(
        rf"worker 1 \(pid {worker}\) was killed by the kernel's OOM killer "
        rf"\(memory cgroup {re.escape(str(memory.path))}: limit [^)]*\) after .*replacing it"
    )
    print(f"OOM log line: {line.string}")
    assert os.kill(server.pid, 0) is None and server.proc.poll() is None  # same master
    (replacement,) = server.wait_workers(1, exclude={worker})
    assert replacement != worker
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"after the OOM kill") == b"after the OOM kill"
    wait_until(
        lambda: metric(server, "echod_worker_restarts_total", reason="oom") == 1,
        10,
        message='restarts_total{reason="oom"} == 1',
    )
    assert metric(server, "echod_worker_restarts_total", reason="crashed") == 0
