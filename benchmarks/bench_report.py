"""Pure part of the benchmark harness: parse compare.py's runs.jsonl, judge the
targets, render the Markdown report.  No processes, no sockets: unit-testable."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# compare.py's scenario names, in its order, with a short description.
SCENARIOS: dict[str, str] = {
    "rr-64B-c50": "request/response, 64 B, 50 clients",
    "rr-1KiB-c50": "request/response, 1 KiB, 50 clients",
    "rr-16KiB-c50": "request/response, 16 KiB, 50 clients",
    "rr-64B-c1": "request/response, 64 B, 1 client (unloaded latency)",
    "stream-64KiB-c8": "bulk stream, 64 KiB chunks, 8 connections (op = one 64 KiB chunk)",
    "connect-c50": "connect, 64 B echo, close, 50 slots (op = one connection)",
    "idle5k-rr-64B-c50": "rr-64B-c50 with 5000 idle connections held open",
}
IDLE_SCENARIO = "idle5k-rr-64B-c50"
IDLE_BASE_SCENARIO = "rr-64B-c50"

# echod CPU us/op divided by refecho's, in the same configuration: at most this.
CPU_RATIO_TARGETS: dict[str, float] = {
    "rr-64B-c50": 1.10,
    "rr-1KiB-c50": 1.10,
    "rr-16KiB-c50": 1.15,
    "stream-64KiB-c8": 1.00,
    "connect-c50": 1.15,
}
RETENTION_TARGET = 0.95  # idle5k rate / rr-64B-c50 rate: at least this
MEMORY_TARGET_BYTES = 4096  # worker RSS growth per idle connection: at most this
STARTUP_TARGET_S = 0.5  # spawn to first echo, median: at most this

# echoload JSON counters that mean a run was not clean (compare.py's list).
TROUBLE_KEYS = (
    "mismatches",
    "conn_errors",
    "timeouts",
    "setup_errors",
    "idle_dropped",
    "idle_unanswered",
)


# ------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class Run:
    """One echoload run from runs.jsonl, reduced to what the report uses."""

    server: str
    scenario: str
    rep: int
    ops_per_s: float | None
    mb_per_s: float | None  # echoed bytes (rx), MB = 10^6 bytes
    p50_us: float | None
    p99_us: float | None
    cpu_us_per_op: float | None  # server CPU (all its processes) per completed op
    trouble: str  # "" when clean


def _trouble(obj: dict) -> str:
    if "error" in obj:
        return str(obj["error"])
    bits = [f"{k}={obj[k]}" for k in TROUBLE_KEYS if obj.get(k)]
    if obj.get("rc") not in (0, None):
        bits.append(f"echoload rc={obj['rc']}")
    idle = obj.get("idle") or 0
    if idle and (obj.get("idle_alive_end") or 0) < idle:
        bits.append(f"idle_alive={obj.get('idle_alive_end')}/{idle}")
    return ", ".join(bits)


def parse_run(obj: dict) -> Run:
    """One runs.jsonl object -> Run.  Error records (echoload failed) keep only the error."""
    failed = "error" in obj
    lat = {} if failed else obj.get("lat_us") or {}
    ops = None if failed else obj.get("ops_per_s")
    cpu_pct = None if failed else obj.get("server_cpu_pct")
    # same formula as compare.py: CPU share of the window / ops per second
    cpu = cpu_pct / 100.0 / ops * 1e6 if ops and cpu_pct is not None else None
    return Run(
        server=str(obj["server"]),
        scenario=str(obj["scenario"]),
        rep=int(obj.get("rep", 0)),
        ops_per_s=ops,
        mb_per_s=None if failed else obj.get("rx_MBps"),
        p50_us=lat.get("p50"),
        p99_us=lat.get("p99"),
        cpu_us_per_op=cpu,
        trouble=_trouble(obj),
    )


def parse_runs_jsonl(text: str, source: str = "runs.jsonl") -> list[Run]:
    runs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            runs.append(parse_run(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{source}:{lineno}: not a compare.py run record: {e}") from e
    return runs


def load_runs(path: Path) -> list[Run]:
    return parse_runs_jsonl(path.read_text(), str(path)) if path.exists() else []


# ------------------------------------------------------------------ aggregation
def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


@dataclass(frozen=True)
class Stats:
    """Medians over the repeats of one server in one scenario."""

    runs: int
    cpu_us_per_op: float | None
    cpu_min: float | None
    cpu_max: float | None
    ops_per_s: float | None
    mb_per_s: float | None
    p50_us: float | None
    p99_us: float | None
    troubles: tuple[str, ...]


def summarize(runs: list[Run]) -> Stats:
    cpus = [r.cpu_us_per_op for r in runs if r.cpu_us_per_op is not None]
    return Stats(
        runs=len(runs),
        cpu_us_per_op=_median(cpus),
        cpu_min=min(cpus) if cpus else None,
        cpu_max=max(cpus) if cpus else None,
        ops_per_s=_median(r.ops_per_s for r in runs),
        mb_per_s=_median(r.mb_per_s for r in runs),
        p50_us=_median(r.p50_us for r in runs),
        p99_us=_median(r.p99_us for r in runs),
        troubles=tuple(f"rep {r.rep + 1}: {r.trouble}" for r in runs if r.trouble),
    )


@dataclass
class ConfigResult:
    """All servers of one compare.py invocation (one pinning/worker configuration)."""

    key: str  # e.g. "pinned-w1"; also the sub-folder of the results
    title: str
    servers: list[str]  # in invocation order
    stats: dict[str, dict[str, Stats]]  # server -> scenario -> Stats
    ref: str | None = None
    echod: str | None = None
    peers: list[str] = field(default_factory=list)
    foreign_load: float | None = None  # share of CPU capacity other processes used meanwhile

    def get(self, server: str | None, scenario: str) -> Stats | None:
        return self.stats.get(server or "", {}).get(scenario)

    def cpu(self, server: str | None, scenario: str) -> float | None:
        s = self.get(server, scenario)
        return s.cpu_us_per_op if s else None


def assign_roles(servers: list[str]) -> tuple[str | None, str | None, list[str]]:
    """Reference = first refecho*, echod = first echod*, every other server is a peer."""
    ref = next((s for s in servers if s.startswith("refecho")), None)
    echod = next((s for s in servers if s.startswith("echod")), None)
    peers = [s for s in servers if s not in (ref, echod)]
    return ref, echod, peers


def build_config(
    key: str, title: str, runs: list[Run], servers: list[str] | None = None
) -> ConfigResult:
    """Group runs by server and scenario; `servers` fixes the order (and names servers
    that produced no run at all, e.g. because they failed to start)."""
    order = list(servers or [])
    for r in runs:
        if r.server not in order:
            order.append(r.server)
    grouped: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        grouped.setdefault(r.server, {}).setdefault(r.scenario, []).append(r)
    stats = {srv: {sc: summarize(rs) for sc, rs in by_sc.items()} for srv, by_sc in grouped.items()}
    ref, echod, peers = assign_roles(order)
    return ConfigResult(key, title, order, stats, ref, echod, peers)


def scenarios_of(configs: list[ConfigResult]) -> list[str]:
    seen = {sc for c in configs for by_sc in c.stats.values() for sc in by_sc}
    known = [s for s in SCENARIOS if s in seen]
    return known + sorted(seen - set(known))


# ------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Verdict:
    target: str  # e.g. "rr-64B-c50 CPU ratio <= 1.10"
    scope: str  # config key, or "-" for the stand-alone measurements
    value: str  # what was measured, formatted
    ok: bool | None  # None: could not be judged (no data)

    @property
    def mark(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.ok]


def ratio(cfg: ConfigResult, server: str | None, scenario: str) -> float | None:
    """server's CPU us/op / the reference's (lower is better)."""
    mine, ref = cfg.cpu(server, scenario), cfg.cpu(cfg.ref, scenario)
    return mine / ref if mine is not None and ref else None


def retention(cfg: ConfigResult, server: str | None) -> float | None:
    idle, base = cfg.get(server, IDLE_SCENARIO), cfg.get(server, IDLE_BASE_SCENARIO)
    if idle and base and idle.ops_per_s is not None and base.ops_per_s:
        return idle.ops_per_s / base.ops_per_s
    return None


def best_peer(cfg: ConfigResult, scenario: str) -> tuple[str, float] | None:
    scored = [(p, c) for p in cfg.peers if (c := cfg.cpu(p, scenario)) is not None]
    return min(scored, key=lambda pc: pc[1]) if scored else None


def _clean(cfg: ConfigResult, scenario: str) -> bool:
    s = cfg.get(cfg.echod, scenario)
    return bool(s) and not s.troubles


def ratio_verdict(cfg: ConfigResult, scenario: str) -> Verdict:
    limit = CPU_RATIO_TARGETS[scenario]
    q = ratio(cfg, cfg.echod, scenario)
    name = f"{scenario}: CPU us/op ratio echod/refecho <= {limit:.2f}"
    if q is None:
        return Verdict(name, cfg.key, "no data", None)
    errs = "" if _clean(cfg, scenario) else " (run errors)"
    return Verdict(name, cfg.key, f"{q:.2f}{errs}", q <= limit and not errs)


def retention_verdict(cfg: ConfigResult) -> Verdict:
    q = retention(cfg, cfg.echod)
    name = (
        f"idle-hold retention ({IDLE_SCENARIO} / {IDLE_BASE_SCENARIO} rate) "
        f">= {RETENTION_TARGET:.2f}"
    )
    if q is None:
        return Verdict(name, cfg.key, "no data", None)
    errs = "" if _clean(cfg, IDLE_SCENARIO) and _clean(cfg, IDLE_BASE_SCENARIO) else " (run errors)"
    return Verdict(name, cfg.key, f"{q:.2f}{errs}", q >= RETENTION_TARGET and not errs)


def peer_verdict(cfg: ConfigResult, scenario: str) -> Verdict:
    name = f"{scenario}: echod CPU us/op < best Python peer's"
    mine, best = cfg.cpu(cfg.echod, scenario), best_peer(cfg, scenario)
    if mine is None or best is None:
        return Verdict(name, cfg.key, "no data", None)
    return Verdict(name, cfg.key, f"{mine:.2f} vs {best[1]:.2f} ({best[0]})", mine < best[1])


def config_verdicts(cfg: ConfigResult, scenarios: list[str]) -> list[Verdict]:
    out = [ratio_verdict(cfg, sc) for sc in CPU_RATIO_TARGETS if sc in scenarios]
    if IDLE_SCENARIO in scenarios and IDLE_BASE_SCENARIO in scenarios:
        out.append(retention_verdict(cfg))
    out += [peer_verdict(cfg, sc) for sc in scenarios]
    return out


# ------------------------------------------------------------------ stand-alone probes
@dataclass(frozen=True)
class MemoryResult:
    command: str
    conns: int
    alive_end: int  # idle connections still echoing when RSS was taken
    worker_pid: int
    worker_delta_bytes: int  # RSS growth of the process that grew most (the worker)
    tree_delta_bytes: int  # RSS growth of the whole server process tree
    processes: int

    @property
    def bytes_per_conn(self) -> float:
        return self.worker_delta_bytes / self.conns if self.conns else float("nan")


@dataclass(frozen=True)
class StartupResult:
    command: str
    samples_s: tuple[float, ...]
    foreign_load: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)


def memory_verdict(m: MemoryResult | None) -> Verdict:
    name = f"idle memory: worker RSS growth per connection <= {MEMORY_TARGET_BYTES} B"
    if m is None:
        return Verdict(name, "-", "not measured", None)
    ok = m.bytes_per_conn <= MEMORY_TARGET_BYTES and m.alive_end == m.conns
    lost = "" if m.alive_end == m.conns else f", only {m.alive_end}/{m.conns} still echoing"
    return Verdict(name, "-", f"{m.bytes_per_conn:.0f} B/conn{lost}", ok)


def startup_verdict(s: StartupResult | None) -> Verdict:
    name = f"start-up: spawn to first echo, median <= {STARTUP_TARGET_S:.1f} s"
    if s is None or not s.samples_s:
        return Verdict(name, "-", "not measured", None)
    return Verdict(name, "-", f"{s.median_s:.3f} s", s.median_s <= STARTUP_TARGET_S)


# ------------------------------------------------------------------ rendering
def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _cpu_cell(s: Stats | None) -> str:
    if s is None or s.cpu_us_per_op is None:
        return "-"
    cell = f"{s.cpu_us_per_op:.2f}"
    if s.runs > 1 and s.cpu_min is not None and s.cpu_max is not None:
        cell += f" [{s.cpu_min:.2f}-{s.cpu_max:.2f}]"
    return cell


def _check_cell(cfg: ConfigResult, server: str, scenario: str) -> str:
    if server == cfg.ref:
        return "reference"
    if server != cfg.echod:
        return ""
    bits = []
    if scenario in CPU_RATIO_TARGETS:
        limit = CPU_RATIO_TARGETS[scenario]
        bits.append(f"ratio <= {limit:.2f}: {ratio_verdict(cfg, scenario).mark}")
    bits.append(f"< best peer: {peer_verdict(cfg, scenario).mark}")
    return "; ".join(bits)


FOREIGN_LOAD_WARN = 0.05


def _load_note(share: float | None) -> str:
    if share is None:
        return ""
    note = f"; other processes used {share:.0%} of the CPUs meanwhile"
    return note + " (**noisy: rerun on a quiet machine**)" if share > FOREIGN_LOAD_WARN else note


def _role(cfg: ConfigResult, server: str) -> str:
    return "**" + server + "**" if server == cfg.echod else server


def render_scenario(scenario: str, configs: list[ConfigResult]) -> list[str]:
    out = [f"### {scenario}: {SCENARIOS.get(scenario, '')}", ""]
    out.append(
        "| config | server | server CPU us/op | ratio vs refecho | rate (ops/s) | MB/s "
        "| p50 us | p99 us | check |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
    notes = []
    for cfg in configs:
        for srv in cfg.servers:
            s = cfg.get(srv, scenario)
            q = ratio(cfg, srv, scenario)
            flag = " !" if s and s.troubles else ""
            out.append(
                f"| {cfg.key} | {_role(cfg, srv)}{flag} | {_cpu_cell(s)} "
                f"| {'-' if q is None else f'{q:.2f}'} | {_rate(s and s.ops_per_s)} "
                f"| {_num(s and s.mb_per_s)} | {_num(s and s.p50_us, 0)} "
                f"| {_num(s and s.p99_us, 0)} | {_check_cell(cfg, srv, scenario)} |"
            )
            notes += [f"- {cfg.key} / {srv}: {t}" for t in (s.troubles if s else ())]
    if scenario == IDLE_SCENARIO:
        out.append("")
        out.append(
            f"Idle-hold retention ({IDLE_SCENARIO} rate / {IDLE_BASE_SCENARIO} rate, "
            f"higher is better, target for echod >= {RETENTION_TARGET:.2f}):"
        )
        out.append("")
        for cfg in configs:
            cells = [f"{srv} {_num(retention(cfg, srv), 2)}" for srv in cfg.servers]
            out.append(f"- {cfg.key}: " + ", ".join(cells))
    if notes:
        out += ["", "Runs with errors (`!`):", "", *notes]
    out.append("")
    return out


def render_verdicts(verdicts: list[Verdict]) -> list[str]:
    out = ["| target | config | measured | result |", "|---|---|---|---|"]
    out += [f"| {v.target} | {v.scope} | {v.value} | {v.mark} |" for v in verdicts]
    return out


def render_probes(mem: MemoryResult | None, start: StartupResult | None) -> list[str]:
    out = ["## Stand-alone measurements", ""]
    if mem:
        out += [
            f"**Idle memory**: `{mem.command}`; {mem.conns} idle TCP connections, each verified "
            f"by a 1-byte echo when opened ({mem.alive_end} still echoing after RSS was read). "
            f"Worker (pid {mem.worker_pid}) RSS grew {mem.worker_delta_bytes / 1024:,.0f} KiB = "
            f"**{mem.bytes_per_conn:,.0f} B per connection**; whole process tree "
            f"({mem.processes} processes) {mem.tree_delta_bytes / 1024:,.0f} KiB. "
            "User-space RSS only: kernel socket buffers are not counted.",
            "",
        ]
    if start:
        samples = ", ".join(f"{t:.3f}" for t in start.samples_s)
        out += [
            f"**Start-up**: `{start.command}`; spawn to first successful 1-byte echo, "
            f"median **{start.median_s:.3f} s** of {len(start.samples_s)} runs ({samples} s)"
            f"{_load_note(start.foreign_load)}.",
            "",
        ]
    if not mem and not start:
        out += ["(not run)", ""]
    return out


def render_report(
    configs: list[ConfigResult],
    mem: MemoryResult | None,
    start: StartupResult | None,
    header: list[str],
) -> str:
    scenarios = scenarios_of(configs)
    verdicts = [v for c in configs for v in config_verdicts(c, scenarios)]
    verdicts += [memory_verdict(mem), startup_verdict(start)]
    out = ["# echod benchmark report", "", *header, ""]
    out += [
        "**Orientation.** *Server CPU us/op* = server CPU time (all its processes) / operations "
        "completed in the measured window. *Ratio vs refecho* = this server's CPU us/op / "
        "refecho's in the same configuration: **lower is better**, 1.00 = as cheap as the C "
        "reference. (compare.py's own summary.md orients its ratios the other way: higher is "
        "better.) Rates, MB/s (echoed bytes, 10^6) and latencies are medians over repeats; "
        "`[min-max]` is the CPU us/op spread when repeated.",
        "",
        "## Targets",
        "",
        *render_verdicts(verdicts),
        "",
    ]
    if configs:
        out += ["## Configurations", ""]
        for c in configs:
            out.append(
                f"- **{c.key}**: {c.title}; reference `{c.ref}`, echod `{c.echod}`, "
                f"peers {', '.join(f'`{p}`' for p in c.peers) or 'none'}"
                + _load_note(c.foreign_load)
            )
        out += ["", "## Scenarios", ""]
    for sc in scenarios:
        out += render_scenario(sc, configs)
    out += render_probes(mem, start)
    return "\n".join(out).rstrip() + "\n"


def any_failed(
    configs: list[ConfigResult], mem: MemoryResult | None, start: StartupResult | None
) -> bool:
    scenarios = scenarios_of(configs)
    verdicts = [v for c in configs for v in config_verdicts(c, scenarios)]
    return any(v.ok is False for v in [*verdicts, memory_verdict(mem), startup_verdict(start)])
