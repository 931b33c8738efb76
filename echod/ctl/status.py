"""``echoctl status``: the master and each worker, from the scoreboard and psutil.

Exit codes follow LSB: 0 running, 1 pidfile left but no master, 3 not running.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psutil

from echod.ctl import watch
from echod.ctl.options import positive_float, positive_int
from echod.ctl.output import aligned, human_bytes
from echod.ctl.target import find_master
from echod.scoreboard import Counter, MasterView, SlotView, State
from echod.scoreboard import MasterStatus as ScoreboardStatus

CPU_SAMPLE_SECONDS = 0.2
WATCH_DEFAULT_S, WATCH_MIN_S, WATCH_MAX_S = 2.0, 0.1, 3600.0

EXAMPLES = """examples:
  echoctl status
  echoctl status --json | jq '.workers[].connections'
  echoctl --runtime-dir /run/echod status
  echoctl status --watch                      live rates, redrawn every 2 s
  echoctl status --watch 1 --count 5 --json   five JSON lines, one a second
"""


@dataclass
class WorkerStatus:
    worker: int
    pid: int
    generation: int
    state: str
    uptime_s: float
    cpu_percent: float
    rss_bytes: int
    uss_bytes: int
    connections: int
    share: float  # of the open connections on workers that take new ones (0..1)
    accepted: int
    bytes_in: int
    bytes_out: int
    heartbeat_age_s: float


@dataclass
class MasterStatus:
    pid: int
    version: str
    code_started: str
    started: str
    uptime_s: float
    generation: int
    cpu_percent: float
    rss_bytes: int
    state: str  # serving, draining (echoctl drain), shutting_down, stopping, starting
    config_last_reload_successful: bool
    config_last_reload_success: str  # when the configuration last loaded (ISO 8601)


def _master_state(view: MasterView) -> str:
    if view.status is ScoreboardStatus.SERVING and view.draining:
        return "draining"
    return view.status.name.lower()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status",
        help="show the running master and its workers",
        description="Show the running echod master and a table of its workers "
        "(exit 0 running, 1 stale pidfile, 3 not running).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON document (with --watch: one line a frame)"
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        const=WATCH_DEFAULT_S,
        default=None,
        type=watch_interval,
        metavar="S",
        help=f"live per-worker rates, redrawn every S seconds (default {WATCH_DEFAULT_S:g};"
        f" {WATCH_MIN_S:g}..{WATCH_MAX_S:g}); q or Ctrl-C quits",
    )
    parser.add_argument(
        "--count",
        type=positive_int,
        metavar="N",
        help="with --watch: stop after N frames",
    )
    return parser


def watch_interval(text: str) -> float:
    seconds = positive_float(text)
    if not WATCH_MIN_S <= seconds <= WATCH_MAX_S:
        raise argparse.ArgumentTypeError(
            f"must be {WATCH_MIN_S:g} to {WATCH_MAX_S:g} seconds, not {text!r}"
        )
    return seconds


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.watch is None:
        args.command_parser.error("--count needs --watch")
    if args.watch is not None:
        return watch.run(args)
    master = find_master(args)
    snapshot = master.scoreboard.snapshot()  # one read between folds: totals never go back
    view = snapshot.master
    slots = [slot for slot in snapshot.slots if slot.state != State.FREE]
    processes = {pid: _process(pid) for pid in [master.pid, *(s.pid for s in slots)]}
    cpu = _sample_cpu(processes)
    now_wall, now_mono = time.time(), time.monotonic()
    master_status = MasterStatus(
        pid=master.pid,
        version=view.version,
        code_started=_iso(view.code_started),
        started=_iso(view.master_started),
        uptime_s=round(now_wall - view.master_started, 1),
        generation=view.generation,
        cpu_percent=cpu.get(master.pid, 0.0),
        rss_bytes=_rss(processes.get(master.pid)),
        state=_master_state(view),
        config_last_reload_successful=view.last_reload_successful,
        config_last_reload_success=_iso(view.last_config_load) if view.last_config_load else "",
    )
    workers = [
        _worker_status(slot, processes.get(slot.pid), cpu.get(slot.pid, 0.0), now_wall, now_mono)
        for slot in sorted(slots, key=lambda s: s.worker_id)
    ]
    totals: dict[str, float] = dict(_totals(snapshot.totals(), slots))
    totals["udp_dropped_receive_buffer"] = snapshot.udp_receive_buffer_drops()
    totals["spread_max_over_fair"] = _share_out(workers)
    if args.json:
        print(
            json.dumps(
                {
                    "master": asdict(master_status),
                    "workers": [asdict(w) for w in workers],
                    "totals": totals,
                },
                indent=2,
            )
        )
    else:
        print(_render(master_status, workers, totals))
    return 0


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _sample_cpu(processes: dict[int, psutil.Process | None]) -> dict[int, float]:
    """CPU % of each process over one short window (all sampled together)."""
    before = {}
    for pid, process in processes.items():
        if process is not None:
            try:
                before[pid] = sum(process.cpu_times()[:2])
            except psutil.Error:
                pass
    time.sleep(CPU_SAMPLE_SECONDS)
    usage = {}
    for pid, start in before.items():
        process = processes[pid]
        assert process is not None
        try:
            usage[pid] = round(100 * (sum(process.cpu_times()[:2]) - start) / CPU_SAMPLE_SECONDS, 1)
        except psutil.Error:
            pass
    return usage


def _rss(process: psutil.Process | None) -> int:
    try:
        return process.memory_info().rss if process else 0
    except psutil.Error:
        return 0


def _uss(process: psutil.Process | None) -> int:
    try:
        return process.memory_full_info().uss if process else 0
    except psutil.Error:
        return 0


def _worker_status(
    slot: SlotView, process: psutil.Process | None, cpu: float, now_wall: float, now_mono: float
) -> WorkerStatus:
    return WorkerStatus(
        worker=slot.worker_id,
        pid=slot.pid,
        generation=slot.generation,
        state=slot.state.name.lower(),
        uptime_s=round(now_wall - slot.started, 1),
        cpu_percent=cpu,
        rss_bytes=_rss(process),
        uss_bytes=_uss(process),
        connections=slot.active,
        share=0.0,
        accepted=slot.counter(Counter.ACCEPTED),
        bytes_in=slot.counter(Counter.BYTES_IN),
        bytes_out=slot.counter(Counter.BYTES_OUT),
        heartbeat_age_s=round(max(0.0, now_mono - slot.heartbeat), 1),
    )


def _share_out(workers: list[WorkerStatus]) -> float:
    """Fill in each accepting worker's share; return the busiest one's over the fair
    share (1.00 = perfectly even). Draining workers only lose connections: left out."""
    accepting = [w for w in workers if w.state in ("ready", "retiring")]
    total = sum(w.connections for w in accepting)
    if not total:
        return 0.0
    for w in accepting:
        w.share = round(w.connections / total, 3)
    return round(max(w.connections for w in accepting) * len(accepting) / total, 2)


def _totals(counters: list[int], slots: list[SlotView]) -> dict[str, int]:
    return {
        "connections": counters[Counter.ACCEPTED],
        "active": sum(s.active for s in slots),
        "bytes_in": counters[Counter.BYTES_IN],
        "bytes_out": counters[Counter.BYTES_OUT],
        "udp_received": counters[Counter.UDP_RECEIVED],
        "udp_echoed": counters[Counter.UDP_SENT],
    }


def _iso(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


_STATE_TEXT = {
    "draining": "draining (/readyz 503, serving as before; echoctl undrain ends it)",
    "shutting_down": "shutting down (shutdown_delay: not ready, still serving)",
}


def _render(master: MasterStatus, workers: list[WorkerStatus], totals: dict[str, float]) -> str:
    lines = [
        f"echod {master.version} running: master pid {master.pid}, generation "
        f"{master.generation}, up {human_duration(master.uptime_s)} (since {master.started})",
        f"code started {master.code_started}; master CPU {master.cpu_percent:.1f}%, "
        f"RSS {human_bytes(master.rss_bytes)}",
        f"state: {_STATE_TEXT.get(master.state, master.state)}; last reload "
        f"{'ok' if master.config_last_reload_successful else 'FAILED'}, configuration "
        f"loaded {master.config_last_reload_success or '?'}",
        f"{len(workers)} worker(s), {totals['active']} open connection(s); since start: "
        f"{totals['connections']} connections, {human_bytes(totals['bytes_in'])} in, "
        f"{human_bytes(totals['bytes_out'])} out",
        f"spread: busiest worker holds {totals['spread_max_over_fair']:.2f} x its fair share "
        "of open connections (1.00 = even)"
        if totals["spread_max_over_fair"]
        else "spread: no open connections",
    ]
    if totals["udp_received"] or totals["udp_dropped_receive_buffer"]:
        lines.append(
            f"udp: {totals['udp_received']} datagrams received, {totals['udp_echoed']} echoed;"
            f" {totals['udp_dropped_receive_buffer']} dropped by the kernel"
            " (receive buffer full)"
        )
    lines.append("")
    header = (
        "WORKER",
        "PID",
        "GEN",
        "STATE",
        "UPTIME",
        "CPU%",
        "RSS",
        "USS",
        "CONNS",
        "SHARE",
        "ACCEPTED",
        "IN",
        "OUT",
        "HEARTBEAT",
    )
    rows = [header] + [
        (
            str(w.worker),
            str(w.pid),
            str(w.generation),
            w.state,
            human_duration(w.uptime_s),
            f"{w.cpu_percent:.1f}",
            human_bytes(w.rss_bytes),
            human_bytes(w.uss_bytes),
            str(w.connections),
            f"{100 * w.share:.0f}%",
            str(w.accepted),
            human_bytes(w.bytes_in),
            human_bytes(w.bytes_out),
            f"{w.heartbeat_age_s:.1f}s ago",
        )
        for w in workers
    ]
    lines += aligned(rows, left_column=3)
    return "\n".join(lines)
