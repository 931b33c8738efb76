#!/usr/bin/env python3
"""100,000 concurrent connections on one box, each proven served, while
rr-64B-c50 runs beside them (issue 29).

No process here may hold more than RLIMIT_NOFILE's hard limit (20,000 on the
machine this was written on, without CAP_SYS_RESOURCE to raise it): so echod
runs with ``--workers`` (default 7) and ``max_connections`` just under that
limit, and ``--holders`` client processes (benchmarks/hold_connections.py), each
from its own 127.0.0.x source address, hold the connections.

Steps, with the figures printed as one JSON object at the end:

1. start echod (TCP only, production defaults otherwise); rr-64B-c50 with
   echoload, ``--repeat`` runs of ``--duration`` s: the median rate without
   the idle connections;
2. server PSS (master and workers, smaps_rollup), /proc/net/sockstat and Slab;
3. the holders open ``--connections`` in all, each checked by a 1-byte echo:
   the time until all are established is the accept burst;
4. PSS, sockstat and Slab again; connections per worker (its descriptors);
5. rr-64B-c50 again (as many runs): retention = this median / step 1's;
6. every held connection checked again by a 1-byte echo: alive, dropped,
   unanswered; then everything is stopped.

    .venv/bin/python benchmarks/hold100k.py                       # ~2 min
    .venv/bin/python benchmarks/hold100k.py --connections 20000 --workers 2 --holders 2

Needs echoload built (benchmarks/build/bench, e.g. by benchmarks/peers.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_procs import echo_once, free_port, stop_process

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ECHOLOAD = HERE / "build" / "bench" / "echoload"


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total += int(match.group(1)) if match else 0
    return total


def kernel() -> dict[str, int]:
    sockstat = Path("/proc/net/sockstat").read_text()
    tcp = re.search(r"TCP: inuse (\d+) orphan \d+ tw \d+ alloc (\d+) mem (\d+)", sockstat)
    slab = re.search(r"^Slab:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    assert tcp and slab
    return {
        "tcp_inuse": int(tcp.group(1)),
        "tcp_alloc": int(tcp.group(2)),
        "tcp_mem_pages": int(tcp.group(3)),
        "slab_kib": int(slab.group(1)),
    }


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def rr(port: int, duration: float, repeat: int) -> dict:
    """rr-64B-c50, ``repeat`` runs: the median rate and the errors of all."""
    runs = [rr_once(port, duration) for _ in range(repeat)]
    return {
        "ops_per_s": statistics.median(run["ops_per_s"] for run in runs),
        "runs": [run["ops_per_s"] for run in runs],
        "errors": sum(run["errors"] for run in runs),
    }


def rr_once(port: int, duration: float) -> dict:
    out = subprocess.run(
        [
            str(ECHOLOAD),
            "-p",
            str(port),
            "-m",
            "rr",
            "-s",
            "64",
            "-c",
            "50",
            "-d",
            str(duration),
            "-w",
            "1",
            "-q",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "ops_per_s": result["ops_per_s"],
        "errors": result["mismatches"] + result["conn_errors"] + result["timeouts"],
    }


def wait_serving(proc: subprocess.Popen, port: int, workers: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"echod exited with {proc.returncode}")
        if len(children(proc.pid)) >= workers and echo_once(port, timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit("echod did not serve in time")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=7)
    ap.add_argument("--holders", type=int, default=7)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each rr run")
    ap.add_argument("--repeat", type=int, default=3, help="rr runs alone and beside (median)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--echod-path", default=str(REPO), help="PYTHONPATH for echod (A/B runs)")
    a = ap.parse_args()

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # room for listeners, scoreboard, pipes and logs, and the 64 spare descriptors
    # echod keeps when it sizes its own soft limit (echod.system.nofile)
    per_worker = hard - 128
    if a.connections > per_worker * a.workers:
        raise SystemExit(f"{a.connections} connections need more than {a.workers} workers")
    port = free_port()
    run = Path(tempfile.mkdtemp(prefix="echod-hold-"))
    config = run / "echod.toml"
    config.write_text(f'max_connections = {per_worker}\nbacklog = 65535\nlog_level = "warning"\n')
    env = dict(os.environ, PYTHONPATH=a.echod_path)
    server = subprocess.Popen(
        [
            a.python,
            "-m",
            "echod",
            "-F",
            "-w",
            str(a.workers),
            "-c",
            str(config),
            "--runtime-dir",
            str(run),
            "-b",
            f"127.0.0.1:{port}",
        ],
        env=env,
        start_new_session=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
    )
    holders: list[subprocess.Popen] = []
    report: dict = {"connections": a.connections, "workers": a.workers, "holders": a.holders}
    try:
        wait_serving(server, port, a.workers, time.monotonic() + 30)
        workers = children(server.pid)
        report["rr_alone"] = rr(port, a.duration, a.repeat)
        time.sleep(1)  # its 50 connections closed in the workers too
        tree = [server.pid, *workers]
        fds_before = {pid: descriptors(pid) for pid in workers}
        pss_before, kernel_before = pss_kib(tree), kernel()

        share = a.connections // a.holders
        counts = [share + (1 if i < a.connections % a.holders else 0) for i in range(a.holders)]
        started = time.monotonic()
        for index, count in enumerate(counts):
            holders.append(
                subprocess.Popen(
                    [
                        a.python,
                        str(HERE / "hold_connections.py"),
                        "--port",
                        str(port),
                        "--count",
                        str(count),
                        "--source",
                        f"127.0.0.{index + 2}",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        opened = [json.loads(h.stdout.readline()) for h in holders]  # type: ignore[union-attr]
        report["accept_burst_s"] = round(time.monotonic() - started, 2)
        established = sum(o["established"] for o in opened)
        report["established"] = established
        time.sleep(2)  # let every worker publish and the allocator settle
        pss_held, kernel_held = pss_kib(tree), kernel()
        per = {pid: descriptors(pid) - fds_before[pid] for pid in workers}
        report["per_worker"] = sorted(per.values())
        report["balance_max_over_fair"] = round(max(per.values()) / (established / a.workers), 3)
        report["userland_bytes_per_idle"] = round((pss_held - pss_before) * 1024 / established, 1)
        report["kernel_before"], report["kernel_held"] = kernel_before, kernel_held
        report["kernel_slab_bytes_per_conn"] = round(
            (kernel_held["slab_kib"] - kernel_before["slab_kib"]) * 1024 / established
        )
        report["rr_with_idle"] = rr(port, a.duration, a.repeat)
        report["retention"] = round(
            report["rr_with_idle"]["ops_per_s"] / report["rr_alone"]["ops_per_s"], 3
        )
        results = []
        for holder in holders:
            holder.stdin.write("check\n")  # type: ignore[union-attr]
            holder.stdin.flush()  # type: ignore[union-attr]
        for holder in holders:
            results.append(json.loads(holder.stdout.readline()))  # type: ignore[union-attr]
        for key in ("alive", "dropped", "unanswered"):
            report[f"end_{key}"] = sum(r[key] for r in results)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
        stop_process(server, grace=30)  # TERM; then KILL to its process group
    print(json.dumps(report, indent=1))
    ok = report.get("end_alive") == a.connections == report.get("established")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
