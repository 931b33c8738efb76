#!/usr/bin/env python3
"""Benchmark echod against the C reference server (refecho) and Python peers.

Builds the shared bench kit (echoload, refecho) in benchmarks/build/bench, runs
compare.py once per configuration -- (a) pinned: servers on CPU 0, echoload on
CPU 1, one worker; (b) unpinned, two workers -- then measures echod's idle
memory per connection and its start-up time, and writes
benchmarks/results/<timestamp>/report.md (also printed).

Server command templates may use {python} (this interpreter), {workers} and
{port}; they run from the build folder through /bin/sh, like compare.py's.
Everything stays on loopback.

    benchmarks/run.py --quick                     # smoke run, ~4 min on 2 cores
    benchmarks/run.py --repeat 3                  # the real thing
    benchmarks/run.py --echod-cmd \
        '{python} baselines/prefork_epoll.py --workers {workers} --port {port}'
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling modules, also when imported from tests

import bench_procs as procs  # noqa: E402
import bench_report as rep  # noqa: E402

REPO = HERE.parent
BUILD = HERE / "build" / "bench"
RESULTS = HERE / "results"
DEFAULT_ECHOD = "{python} -m echod -F -w {workers} -b 127.0.0.1:{port}"
DEFAULT_ECHOD_ARGS = "--log-level warning"
QUICK_DURATION, QUICK_WARMUP = 1.0, 0.5
STARTUP_WORKERS = 4


@dataclass(frozen=True)
class ConfigSpec:
    key: str
    title: str
    workers: int
    compare_flags: tuple[str, ...]


CONFIGS = (
    ConfigSpec(
        "pinned-w1",
        "(a) pinned: servers on CPU 0, echoload on CPU 1, 1 worker",
        1,
        ("--server-cpus", "0", "--load-cpus", "1"),
    ),
    ConfigSpec("unpinned-w2", "(b) unpinned, 2 workers", 2, ()),
)


# ------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--bench-dir",
        type=Path,
        default=REPO.parent / "shared" / "bench",
        help="the bench kit to copy and build (default: ../shared/bench from the repo)",
    )
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<time>)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_DURATION:g} s measured + {QUICK_WARMUP:g} s warmup "
        "per scenario unless --duration/--warmup say otherwise",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario; medians reported")
    ap.add_argument("--duration", type=float, help="measured seconds per run (compare.py: 8)")
    ap.add_argument("--warmup", type=float, help="warmup seconds per run (compare.py: 2)")
    ap.add_argument("--scenarios", default="all", help="comma-separated, see compare.py --list")
    ap.add_argument(
        "--parts",
        default="compare,memory,startup",
        help="which parts to run (default all: compare,memory,startup)",
    )
    ap.add_argument(
        "--echod-cmd",
        default=DEFAULT_ECHOD,
        help="echod command template; another server here stands in for echod "
        f"(default {DEFAULT_ECHOD!r} + --echod-args)",
    )
    ap.add_argument(
        "--echod-args",
        default=DEFAULT_ECHOD_ARGS,
        help=f"extra arguments for the default echod command ({DEFAULT_ECHOD_ARGS!r})",
    )
    ap.add_argument("--no-uvloop", action="store_true", help="leave out the uvloop peer")
    ap.add_argument("--mem-cmd", help="server for the idle-memory probe (default echod, 1 worker)")
    ap.add_argument("--mem-conns", type=int, default=5000, help="idle connections (default 5000)")
    ap.add_argument(
        "--startup-cmd", help=f"server for the start-up probe (default echod, -w {STARTUP_WORKERS})"
    )
    ap.add_argument("--startup-runs", type=int, default=5, help="start-up samples (default 5)")
    ap.add_argument("--check", action="store_true", help="exit 3 if any target fails")
    a = ap.parse_args(argv)
    a.parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if bad := a.parts - {"compare", "memory", "startup"}:
        ap.error(f"unknown part(s): {', '.join(sorted(bad))}")
    if a.repeat < 1 or a.mem_conns < 1 or a.startup_runs < 1:
        ap.error("--repeat, --mem-conns and --startup-runs must be >= 1")
    if a.duration is None:
        a.duration = QUICK_DURATION if a.quick else 8.0
    if a.warmup is None:
        a.warmup = QUICK_WARMUP if a.quick else 2.0
    return a


def echod_template(a: argparse.Namespace) -> str:
    if a.echod_cmd == DEFAULT_ECHOD and a.echod_args.strip():
        return f"{DEFAULT_ECHOD} {a.echod_args.strip()}"
    return a.echod_cmd


def fill(template: str, workers: int | None = None, port: int | None = None) -> str:
    """Substitute our placeholders; {port}/{host} stay for compare.py unless port is given."""
    cmd = template.replace("{python}", shlex.quote(sys.executable))
    if workers is not None:
        cmd = cmd.replace("{workers}", str(workers))
    if port is not None:
        cmd = cmd.replace("{port}", str(port)).replace("{host}", procs.HOST)
    return cmd


def server_specs(a: argparse.Namespace, workers: int) -> list[tuple[str, str]]:
    """(name, command) for one configuration; refecho first: it is the ratio base."""
    tail = "--workers {workers} --port {port}"
    proto = "{python} baselines/asyncio_proto.py"
    specs = [
        ("refecho", "./refecho -q -w {workers} -p {port}"),
        ("echod", echod_template(a)),
        ("asyncio-proto", f"{proto} {tail}"),
    ]
    if not a.no_uvloop and importlib.util.find_spec("uvloop") is not None:
        specs.append(("uvloop-proto", f"{proto} --loop uvloop {tail}"))
    specs.append(("prefork-epoll", f"{{python}} baselines/prefork_epoll.py --api epoll {tail}"))
    return [(f"{name}-w{workers}", fill(cmd, workers)) for name, cmd in specs]


# ------------------------------------------------------------------ bench kit
def _copy_writable(src: str, dst: str) -> None:
    # the kit is read-only; our copy must be overwritable on the next run
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dst)
    shutil.copy2(src, dst)
    os.chmod(dst, os.stat(dst).st_mode | stat.S_IWUSR)


def prepare_bench(src: Path, dst: Path) -> None:
    """Copy the kit (mtimes kept, so make rebuilds only what changed) and build it."""
    if not (src / "compare.py").is_file():
        raise SystemExit(f"run.py: no compare.py in {src} (see --bench-dir)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        src,
        dst,
        dirs_exist_ok=True,
        copy_function=_copy_writable,
        ignore=shutil.ignore_patterns("results", "__pycache__", "echoload", "refecho"),
    )
    for d, _, _ in os.walk(dst):  # copytree copied the read-only directory modes too
        os.chmod(d, os.stat(d).st_mode | stat.S_IWUSR)
    subprocess.run(["make", "-C", str(dst)], check=True, stdout=sys.stderr)


def child_env() -> dict[str, str]:
    """`python -m echod` must import this checkout even where it is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


# ------------------------------------------------------------------ the parts
def log(msg: str) -> None:
    print(f"run.py: {msg}", file=sys.stderr, flush=True)


def run_compare(
    a: argparse.Namespace, spec: ConfigSpec, outdir: Path
) -> tuple[rep.ConfigResult, int]:
    servers = server_specs(a, spec.workers)
    sub = outdir / spec.key
    sub.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(BUILD / "compare.py"),
        "--out",
        str(sub),
        "--repeat",
        str(a.repeat),
        "--duration",
        str(a.duration),
        "--warmup",
        str(a.warmup),
        "--scenarios",
        a.scenarios,
        *spec.compare_flags,
        *(f"{n}={c}" for n, c in servers),
    ]
    nscen = len(rep.SCENARIOS) if a.scenarios == "all" else len(a.scenarios.split(","))
    # compare.py's own worst case: 3 priming runs + every echoload run hitting its timeout
    timeout = len(servers) * a.repeat * (200 + nscen * (a.duration + a.warmup + 130))
    log(f"{spec.key}: compare.py with {', '.join(n for n, _ in servers)}")
    load = procs.ForeignLoad()
    rc = procs.run_supervised(cmd, BUILD, child_env(), timeout, sub / "compare-stdout.md")
    cfg = rep.build_config(
        spec.key, spec.title, rep.load_runs(sub / "runs.jsonl"), [n for n, _ in servers]
    )
    cfg.foreign_load = load.share()
    return cfg, rc


def measure_memory(template: str, conns: int, outdir: Path) -> rep.MemoryResult:
    procs.raise_nofile(conns + 1024)  # before spawning: the server inherits it
    port = procs.free_port()
    log_path = outdir / "memory-server.log"
    with procs.server(fill(template, 1, port), BUILD, child_env(), log_path) as p:
        procs.wait_ready(p, port, timeout=20)
        time.sleep(0.5)  # workers finish starting before the baseline
        before = procs.settled_snapshot(p.pid)
        socks = procs.open_idle(port, conns, deadline=time.monotonic() + 120)
        try:
            after = procs.settled_snapshot(p.pid)
            alive = count_alive(socks, deadline=time.monotonic() + 60)
        finally:
            procs.close_all(socks)
    # a process that appeared meanwhile (a respawn) counts with its whole RSS
    deltas = {pid: rss - before.get(pid, 0) for pid, rss in after.items()}
    if not deltas:
        raise RuntimeError("server process tree vanished")
    worker = max(deltas, key=lambda pid: deltas[pid])
    return rep.MemoryResult(
        fill(template, 1), conns, alive, worker, deltas[worker], sum(deltas.values()), len(deltas)
    )


def count_alive(socks: list, deadline: float) -> int:
    alive = 0
    for s in socks:
        if time.monotonic() > deadline:
            break
        alive += procs.echo_byte(s)
    return alive


def measure_startup(template: str, runs: int, outdir: Path) -> rep.StartupResult:
    samples, load = [], procs.ForeignLoad()
    for _ in range(runs):
        port = procs.free_port()
        cmd = fill(template, STARTUP_WORKERS, port)
        t0 = time.monotonic()
        with procs.server(cmd, BUILD, child_env(), outdir / "startup-server.log") as p:
            procs.wait_ready(p, port, timeout=20, interval=0.002)
            samples.append(time.monotonic() - t0)
    return rep.StartupResult(fill(template, STARTUP_WORKERS), tuple(samples), load.share())


# ------------------------------------------------------------------ report
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def header(a: argparse.Namespace, problems: list[str]) -> list[str]:
    lines = [
        f"- {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.uname().nodename}, Linux "
        f"{os.uname().release}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"commit {git_commit()}",
        f"- {a.warmup:g} s warmup + {a.duration:g} s measured per scenario run, "
        f"repeat {a.repeat}{' (--quick)' if a.quick else ''}",
        f"- echod command: `{fill(echod_template(a))}`",
    ]
    if "-m echod" not in echod_template(a):
        lines.append(
            "- **NOTE: the `echod` rows come from a stand-in server (--echod-cmd), "
            "not from echod.**"
        )
    lines += [f"- **problem:** {p}" for p in problems]
    return lines


def write_outputs(
    outdir: Path,
    report: str,
    configs: list[rep.ConfigResult],
    mem: rep.MemoryResult | None,
    start: rep.StartupResult | None,
) -> None:
    (outdir / "report.md").write_text(report)
    scen = rep.scenarios_of(configs)
    verdicts = [v for c in configs for v in rep.config_verdicts(c, scen)]
    verdicts += [rep.memory_verdict(mem), rep.startup_verdict(start)]
    data = {
        "verdicts": [asdict(v) for v in verdicts],
        "memory": asdict(mem) if mem else None,
        "startup": {
            "command": start.command,
            "samples_s": start.samples_s,
            "median_s": statistics.median(start.samples_s),
        }
        if start
        else None,
    }
    (outdir / "verdicts.json").write_text(json.dumps(data, indent=1) + "\n")


# ------------------------------------------------------------------ main
def _sigterm(_signo: int, _frame: object) -> None:
    raise KeyboardInterrupt  # same clean-up path as Ctrl-C


def run_parts(
    a: argparse.Namespace, outdir: Path, problems: list[str]
) -> tuple[list[rep.ConfigResult], rep.MemoryResult | None, rep.StartupResult | None]:
    configs, mem, start = [], None, None
    if "compare" in a.parts:
        for spec in CONFIGS:
            cfg, rc = run_compare(a, spec, outdir)
            configs.append(cfg)
            if rc != 0:
                problems.append(f"compare.py ({spec.key}) exited {rc} (1 = a data mismatch)")
            problems += [
                f"{spec.key}: no results from `{name}` (did it start? see "
                f"{outdir / spec.key / f'server-{name}.log'})"
                for name in cfg.servers
                if name not in cfg.stats
            ]
    if "memory" in a.parts:
        log(f"idle memory: {a.mem_conns} connections")
        try:
            mem = measure_memory(a.mem_cmd or echod_template(a), a.mem_conns, outdir)
        except (RuntimeError, TimeoutError, OSError) as e:
            problems.append(f"idle memory probe failed: {e}")
    if "startup" in a.parts:
        log(f"start-up: {a.startup_runs} runs")
        try:
            start = measure_startup(a.startup_cmd or echod_template(a), a.startup_runs, outdir)
        except (RuntimeError, TimeoutError, OSError) as e:
            problems.append(f"start-up probe failed: {e}")
    return configs, mem, start


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _sigterm)
    procs.become_subreaper()
    procs.raise_nofile(a.mem_conns + 1024)  # idle5k and the memory probe: servers inherit it
    outdir = (a.out or RESULTS / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if "compare" in a.parts and any((outdir / c.key / "runs.jsonl").exists() for c in CONFIGS):
        # compare.py appends to runs.jsonl: old runs would mix in
        raise SystemExit(f"run.py: {outdir} already holds runs; choose another --out")
    outdir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    try:
        prepare_bench(a.bench_dir.resolve(), BUILD)
        configs, mem, start = run_parts(a, outdir, problems)
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        return 130
    except (TimeoutError, subprocess.CalledProcessError) as e:
        log(f"failed: {e}")
        return 1
    finally:
        if n := procs.reap_orphans():
            log(f"killed {n} left-over process(es)")
    report = rep.render_report(configs, mem, start, header(a, problems))
    write_outputs(outdir, report, configs, mem, start)
    print(report)
    log(f"report: {outdir / 'report.md'}")
    if problems:
        return 1
    return 3 if a.check and rep.any_failed(configs, mem, start) else 0


if __name__ == "__main__":
    sys.exit(main())
