"""What ``GET /metrics`` says: every number comes from the scoreboard (and psutil for
CPU and memory), rendered by prometheus_client: the text format 0.0.4, or OpenMetrics when the
scraper asks for it.

Totals are the retired-worker totals in the scoreboard header (folded in by the
master when it reaps a worker) plus the live slots, read between folds, so a
total never goes backwards when a worker dies or is replaced.
"""

from __future__ import annotations

import gzip
import platform
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.registry import CollectorRegistry

from echod.scoreboard import (
    CLOSE_REASONS,
    Counter,
    MasterCounter,
    Scoreboard,
    SlotView,
    State,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ACCEPT_ERRORS = {
    "EMFILE": Counter.ACCEPT_EMFILE,
    "ENFILE": Counter.ACCEPT_ENFILE,
    "ENOMEM": Counter.ACCEPT_ENOMEM,
    "ECONNABORTED": Counter.ACCEPT_ABORTED,
    "other": Counter.ACCEPT_OTHER,
}
UDP_RESULTS = {
    "echoed": Counter.UDP_SENT,
    "dropped_reflector_port": Counter.UDP_DROPPED_PORT,
    "dropped_source_address": Counter.UDP_DROPPED_ADDRESS,
    "dropped_rate_limit": Counter.UDP_DROPPED_RATE,
    "dropped_total_rate_limit": Counter.UDP_DROPPED_RATE_TOTAL,
}
PROXY_RESULTS = {
    "proxied": Counter.PROXY_PROXIED,
    "local": Counter.PROXY_LOCAL,
    "malformed": Counter.PROXY_MALFORMED,
    "timeout": Counter.PROXY_TIMEOUT,
    "closed_early": Counter.PROXY_CLOSED_EARLY,
}
REJECTIONS = {
    "denied": Counter.REJECTED_DENIED,
    "per_ip_limit": Counter.REJECTED_PER_IP,
    "total_limit": Counter.REJECTED_TOTAL,
}
RESTARTS = {
    "crashed": MasterCounter.RESTARTS_CRASHED,
    "oom": MasterCounter.RESTARTS_OOM,
    "timeout": MasterCounter.RESTARTS_TIMEOUT,
    "recycled": MasterCounter.RESTARTS_RECYCLED,
    "boot_failed": MasterCounter.RESTARTS_BOOT_FAILED,
}
RELOADS = {"ok": MasterCounter.RELOADS_OK, "failed": MasterCounter.RELOADS_FAILED}
UPGRADES = {"ok": MasterCounter.UPGRADES_OK, "failed": MasterCounter.UPGRADES_FAILED}
WORKER_STATES = (State.BOOTING, State.READY, State.DRAINING, State.RETIRING)


@dataclass
class MetricFamily:
    name: str  # counters end in _total, as their samples do
    kind: str  # "counter" or "gauge"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> MetricFamily:
        self.samples.append((labels, value))
        return self

    def to_prometheus(self) -> Metric:
        family: Metric = (
            CounterMetricFamily(self.name, self.help)
            if self.kind == "counter"
            else GaugeMetricFamily(self.name, self.help)
        )
        for labels, value in self.samples:
            # Counter samples carry the _total name; no _created (it would double the
            # series, and echod_master_start_time_seconds already says when).
            family.add_sample(
                family.name + ("_total" if self.kind == "counter" else ""), labels, value
            )
        return family


class ScoreboardCollector:
    """A prometheus_client collector over one scoreboard: each scrape is one read.

    Registered in a private registry, so none of the library's default collectors
    (its process_* would describe the metrics child, not the master) get in.
    """

    def __init__(self, board: Scoreboard, sampler: ProcessSampler, max_fds: int | None) -> None:
        self.board = board
        self.sampler = sampler
        self.max_fds = max_fds

    def describe(self) -> list[Metric]:
        return []  # don't let register() run a whole scrape just to learn the names

    def collect(self) -> Iterator[Metric]:
        for family in collect(self.board, self.sampler, self.max_fds):
            yield family.to_prometheus()


@dataclass(frozen=True)
class Exposition:
    body: bytes
    content_type: str
    gzipped: bool


def registry_for(collector: ScoreboardCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def expose(registry: CollectorRegistry, accept: str, accept_encoding: str) -> Exposition:
    """The scrape's body in the format the scraper's Accept asks for (OpenMetrics or
    text 0.0.4), gzipped when its Accept-Encoding allows."""
    encoder, content_type = choose_encoder(accept)
    if content_type.startswith("text/plain"):
        # Newer clients offer text/plain;version=1.0.0, whose escaping older
        # scrapers and promtool don't read: always serve the classic 0.0.4.
        encoder, content_type = generate_latest, CONTENT_TYPE
    body = encoder(registry)
    if _accepts_gzip(accept_encoding):
        return Exposition(gzip.compress(body, compresslevel=6), content_type, True)
    return Exposition(body, content_type, False)


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


@dataclass
class ProcessSample:
    cpu_seconds: float
    rss: int
    virtual: int = 0
    started: float = 0.0
    open_fds: int = 0


class ProcessSampler:
    """CPU and memory of echod's processes through psutil, keeping Process objects."""

    def __init__(self) -> None:
        self.processes: dict[int, psutil.Process] = {}

    def sample(self, pid: int, detailed: bool = False) -> ProcessSample | None:
        try:
            process = self.processes.get(pid)
            if process is None:
                process = self.processes[pid] = psutil.Process(pid)
            with process.oneshot():
                cpu = process.cpu_times()
                memory = process.memory_info()
                sample = ProcessSample(cpu.user + cpu.system, memory.rss)
                if detailed:
                    sample.virtual = memory.vms
                    sample.started = process.create_time()
                    sample.open_fds = process.num_fds()
            return sample
        except psutil.Error:
            self.processes.pop(pid, None)
            return None

    def keep_only(self, pids: set[int]) -> None:
        for pid in set(self.processes) - pids:
            del self.processes[pid]


def collect(
    board: Scoreboard, sampler: ProcessSampler, max_fds: int | None = None
) -> list[MetricFamily]:
    """Every family, from one consistent read of the scoreboard."""
    snapshot = board.snapshot()
    master, slots = snapshot
    totals = snapshot.totals()
    now = time.monotonic()

    def counter(name: str, help_text: str) -> MetricFamily:
        return MetricFamily(name, "counter", help_text)

    def gauge(name: str, help_text: str) -> MetricFamily:
        return MetricFamily(name, "gauge", help_text)

    families = [
        gauge("echod_build_info", "echod's version and Python's, as a constant 1").add(
            1, version=master.version, python=platform.python_version()
        ),
        gauge("echod_master_start_time_seconds", "When the master started (Unix time)").add(
            master.master_started
        ),
        gauge("echod_generation", "Configuration generation (1 at start, +1 per reload)").add(
            master.generation
        ),
        gauge("echod_draining", "1 while drained by echoctl drain (/readyz 503), else 0").add(
            int(master.draining)
        ),
        gauge(
            "echod_config_last_reload_successful",
            "Whether the last configuration reload (HUP) loaded (1) or not (0)",
        ).add(int(master.last_reload_successful)),
        gauge(
            "echod_config_last_reload_success_timestamp_seconds",
            "When the configuration last loaded successfully (start, upgrade or reload)",
        ).add(master.last_config_load),
    ]
    workers = gauge("echod_workers", "Worker processes by state")
    for state in WORKER_STATES:
        workers.add(sum(1 for s in slots if s.state == state), state=state.name.lower())
    families.append(workers)
    families.append(
        _labelled(
            counter("echod_worker_restarts_total", "Workers replaced, by why the old one left"),
            "reason",
            RESTARTS,
            master.events,
        )
    )
    families.append(
        _labelled(
            counter("echod_reloads_total", "Reloads (HUP), by result"),
            "result",
            RELOADS,
            master.events,
        )
    )
    families.append(
        _labelled(
            counter("echod_upgrades_total", "In-place upgrades (USR2), by result"),
            "result",
            UPGRADES,
            master.events,
        )
    )
    families += [
        gauge("echod_connections_active", "Open stream connections, all workers").add(
            sum(s.active for s in slots)
        ),
        counter("echod_connections_total", "Stream connections accepted").add(
            totals[Counter.ACCEPTED]
        ),
        _labelled(
            counter("echod_connections_closed_total", "Stream connections closed, by why"),
            "reason",
            {name: c for c, name in CLOSE_REASONS.items()},
            totals,
        ),
        _labelled(
            counter(
                "echod_connections_rejected_total",
                "Connections refused by admission control, by rule",
            ),
            "reason",
            REJECTIONS,
            totals,
        ),
        counter("echod_accept_paused_total", "Times a worker stopped accepting for a while")
        .add(totals[Counter.REJECTED_MAX_CONNECTIONS], reason="max_connections")
        .add(totals[Counter.ACCEPT_PAUSED_EMFILE], reason="out_of_descriptors"),
        _labelled(
            counter("echod_accept_errors_total", "accept() failures by errno"),
            "errno",
            ACCEPT_ERRORS,
            totals,
        ),
        counter(
            "echod_socket_errors_total",
            "Unexpected socket errors (failed accepts, UDP send/receive failures)",
        ).add(totals[Counter.ERRORS]),
        counter("echod_bytes_received_total", "Bytes received (stream = TCP and unix sockets)")
        .add(totals[Counter.BYTES_IN], transport="stream")
        .add(totals[Counter.UDP_BYTES_IN], transport="udp"),
        counter("echod_bytes_sent_total", "Bytes echoed back (stream = TCP and unix sockets)")
        .add(totals[Counter.BYTES_OUT], transport="stream")
        .add(totals[Counter.UDP_BYTES_OUT], transport="udp"),
        counter("echod_udp_datagrams_received_total", "UDP datagrams received").add(
            totals[Counter.UDP_RECEIVED]
        ),
        _labelled(
            counter("echod_udp_datagrams_total", "UDP datagrams by what became of them"),
            "result",
            UDP_RESULTS,
            totals,
        ),
        _labelled(
            counter(
                "echod_proxy_headers_total",
                "PROXY protocol headers from proxy_protocol_from sources, by outcome",
            ),
            "result",
            PROXY_RESULTS,
            totals,
        ),
        counter(
            "echod_udp_receive_buffer_drops_total",
            "UDP datagrams the kernel dropped before echod read them: a socket's"
            " receive buffer was full (SO_MEMINFO; see udp_receive_buffer)",
        ).add(snapshot.udp_receive_buffer_drops()),
    ]
    families += _per_worker(slots, sampler, now)
    families += _master_process(master.pid, sampler, max_fds)
    sampler.keep_only({master.pid, *(s.pid for s in slots)})
    return families


def _labelled(
    family: MetricFamily, label: str, indices: dict[str, int], values: Sequence[int]
) -> MetricFamily:
    for name, index in indices.items():
        family.add(values[index], **{label: name})
    return family


def _per_worker(
    slots: Sequence[SlotView], sampler: ProcessSampler, now: float
) -> list[MetricFamily]:
    info = MetricFamily(
        "echod_worker_info", "gauge", "One per live worker: its pid, generation and state"
    )
    active = MetricFamily(
        "echod_worker_connections_active", "gauge", "Open stream connections per worker"
    )
    accepted = MetricFamily(
        "echod_worker_connections_total",
        "counter",
        "Stream connections accepted per worker (resets when it is replaced)",
    )
    heartbeat = MetricFamily(
        "echod_worker_heartbeat_age_seconds", "gauge", "Seconds since each worker's last heartbeat"
    )
    cpu = MetricFamily(
        "echod_worker_cpu_seconds_total", "counter", "CPU time (user + system) per worker"
    )
    rss = MetricFamily("echod_worker_resident_memory_bytes", "gauge", "Resident memory per worker")
    for slot in sorted(slots, key=lambda s: s.worker_id):
        worker = str(slot.worker_id)
        info.add(
            1,
            worker=worker,
            pid=str(slot.pid),
            generation=str(slot.generation),
            state=slot.state.name.lower(),
        )
        active.add(slot.active, worker=worker)
        accepted.add(slot.counters[Counter.ACCEPTED], worker=worker)
        heartbeat.add(round(max(0.0, now - slot.heartbeat), 3), worker=worker)
        sample = sampler.sample(slot.pid)
        if sample is not None:
            cpu.add(round(sample.cpu_seconds, 2), worker=worker)
            rss.add(sample.rss, worker=worker)
    return [info, active, accepted, heartbeat, cpu, rss]


def _master_process(pid: int, sampler: ProcessSampler, max_fds: int | None) -> list[MetricFamily]:
    """The conventional process_* metrics, describing the master."""
    sample = sampler.sample(pid, detailed=True)
    if sample is None:
        return []
    families = [
        MetricFamily(
            "process_cpu_seconds_total", "counter", "Master: CPU time (user + system)"
        ).add(round(sample.cpu_seconds, 2)),
        MetricFamily("process_resident_memory_bytes", "gauge", "Master: resident memory").add(
            sample.rss
        ),
        MetricFamily("process_virtual_memory_bytes", "gauge", "Master: virtual memory").add(
            sample.virtual
        ),
        MetricFamily("process_start_time_seconds", "gauge", "Master: start time (Unix time)").add(
            sample.started
        ),
        MetricFamily("process_open_fds", "gauge", "Master: open file descriptors").add(
            sample.open_fds
        ),
    ]
    if max_fds is None:
        max_fds = descriptor_limit(pid)
    if max_fds is not None:
        families.append(
            MetricFamily("process_max_fds", "gauge", "Master: file descriptor limit").add(max_fds)
        )
    return families


def descriptor_limit(pid: int) -> int | None:
    """The master's soft RLIMIT_NOFILE, read at each scrape: the master raises it
    before forking and again when a reload needs more (prlimit: our own parent, same
    user). Our own limit, inherited from it, where prlimit is refused."""
    try:
        soft, _ = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft
