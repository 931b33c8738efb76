"""Cheap checks of the benchmark harness: parsing, targets and report rendering on a
canned runs.jsonl, plus `run.py --help`.  Nothing here starts a server.

tests/unit/data/bench_runs_sample.jsonl is an excerpt of a real `run.py --quick` run
(configuration pinned-w1; the `echod-w1` rows there came from the prefork-epoll
baseline standing in for echod)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from support.paths import REPO

ROOT = REPO
RUN_PY = ROOT / "benchmarks" / "run.py"
SAMPLE = Path(__file__).resolve().parent / "data" / "bench_runs_sample.jsonl"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


run = _load("bench_run", RUN_PY)  # puts benchmarks/ on sys.path for its siblings
rep = run.rep


def raw_records() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


def raw(server: str, scenario: str) -> dict:
    return next(r for r in raw_records() if r["server"] == server and r["scenario"] == scenario)


def cpu_us(r: dict) -> float:
    return r["server_cpu_pct"] / 100 / r["ops_per_s"] * 1e6


@pytest.fixture
def cfg() -> rep.ConfigResult:
    return rep.build_config("pinned-w1", "pinned", rep.load_runs(SAMPLE))


def test_help_exits_zero() -> None:
    out = subprocess.run(
        [sys.executable, str(RUN_PY), "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "--echod-cmd" in out.stdout and "--quick" in out.stdout


def test_parse_sample() -> None:
    runs = rep.load_runs(SAMPLE)
    assert len(runs) == 16
    r = next(x for x in runs if x.server == "refecho-w1" and x.scenario == "rr-64B-c50")
    src = raw("refecho-w1", "rr-64B-c50")
    assert r.ops_per_s == src["ops_per_s"]
    assert r.p99_us == src["lat_us"]["p99"]
    assert r.mb_per_s == src["rx_MBps"]
    assert r.cpu_us_per_op == pytest.approx(cpu_us(src))
    assert r.trouble == ""


def test_roles(cfg: rep.ConfigResult) -> None:
    assert cfg.ref == "refecho-w1"
    assert cfg.echod == "echod-w1"
    assert cfg.peers == ["uvloop-proto-w1", "prefork-epoll-w1"]


def test_ratio_is_echod_over_refecho(cfg: rep.ConfigResult) -> None:
    want = cpu_us(raw("echod-w1", "rr-64B-c50")) / cpu_us(raw("refecho-w1", "rr-64B-c50"))
    assert rep.ratio(cfg, "echod-w1", "rr-64B-c50") == pytest.approx(want)
    v = rep.ratio_verdict(cfg, "rr-64B-c50")
    assert v.value == f"{want:.2f}"
    assert v.ok is (want <= 1.10)


def test_peer_and_retention_verdicts(cfg: rep.ConfigResult) -> None:
    sc = "stream-64KiB-c8"
    peers = {p: cpu_us(raw(p, sc)) for p in ("uvloop-proto-w1", "prefork-epoll-w1")}
    best = min(peers, key=peers.__getitem__)
    assert rep.best_peer(cfg, sc) == (best, pytest.approx(peers[best]))
    assert rep.peer_verdict(cfg, sc).ok is (cpu_us(raw("echod-w1", sc)) < peers[best])
    want = (
        raw("echod-w1", "idle5k-rr-64B-c50")["ops_per_s"]
        / raw("echod-w1", "rr-64B-c50")["ops_per_s"]
    )
    assert rep.retention(cfg, "echod-w1") == pytest.approx(want)
    assert rep.retention_verdict(cfg).ok is (want >= 0.95)


def test_run_errors_fail_the_target() -> None:
    recs = raw_records()
    for r in recs:
        if r["server"] == "echod-w1" and r["scenario"] == "rr-64B-c50":
            r["server_cpu_pct"] = 1.0  # absurdly cheap, but...
            r["mismatches"] = 3  # ...it echoed wrong bytes
    text = "\n".join(json.dumps(r) for r in recs)
    cfg = rep.build_config("pinned-w1", "pinned", rep.parse_runs_jsonl(text))
    v = rep.ratio_verdict(cfg, "rr-64B-c50")
    assert v.ok is False and "run errors" in v.value
    report = rep.render_report([cfg], None, None, [])
    assert "**echod-w1** !" in report
    assert "mismatches=3" in report


def test_error_record_and_missing_server() -> None:
    text = json.dumps(
        {"error": "echoload timed out", "server": "echod-w1", "scenario": "connect-c50", "rep": 0}
    )
    cfg = rep.build_config("x", "x", rep.parse_runs_jsonl(text), ["refecho-w1", "echod-w1"])
    assert cfg.cpu("echod-w1", "connect-c50") is None
    assert rep.ratio_verdict(cfg, "connect-c50").ok is None  # no reference data: n/a
    assert "echoload timed out" in rep.render_report([cfg], None, None, [])


def test_malformed_line_names_its_line() -> None:
    with pytest.raises(ValueError, match=r"runs.jsonl:2:"):
        rep.parse_runs_jsonl('{"server": "a", "scenario": "b"}\n{not json\n')


def test_report_renders_everything(cfg: rep.ConfigResult) -> None:
    mem = rep.MemoryResult("srv {port}", 5000, 5000, 42, 5000 * 300, 5000 * 310, 2)
    start = rep.StartupResult("srv {port}", (0.2, 0.1, 0.3, 0.6, 0.25))
    report = rep.render_report([cfg], mem, start, ["- header line"])
    assert "lower is better" in report
    for sc in ("rr-64B-c50", "rr-1KiB-c50", "stream-64KiB-c8", "idle5k-rr-64B-c50"):
        assert f"### {sc}:" in report
    assert "| pinned-w1 | **echod-w1** |" in report
    assert "| 300 B/conn | PASS |" in report
    assert "| 0.250 s | PASS |" in report
    assert "Idle-hold retention" in report
    assert not rep.any_failed([], mem, start)
    slow = rep.StartupResult("srv", (0.9, 0.8, 0.7))
    assert rep.any_failed([], mem, slow)


def test_command_templates() -> None:
    a = run.parse_args(["--quick"])
    assert (a.duration, a.warmup) == (run.QUICK_DURATION, run.QUICK_WARMUP)
    specs = dict(run.server_specs(a, 2))
    assert next(iter(specs)) == "refecho-w2"  # first refecho is compare.py's ratio base
    echod = specs["echod-w2"]
    assert echod.startswith(f"{sys.executable} -m echod -F -w 2 -b 127.0.0.1:{{port}}")
    assert echod.endswith("--log-level warning")
    assert "-m echod -F -w 4 " in run.fill(run.echod_template(a), 4, 7007)
    bare = run.parse_args(["--echod-args", "", "--no-uvloop"])
    assert not run.echod_template(bare).endswith("warning")
    assert "uvloop-proto-w1" not in dict(run.server_specs(bare, 1))


def test_proxy_cost_runs_all_three_cases_against_the_real_echod() -> None:
    """A tiny run: proves each case's connections (a trusted one with its v2 header)
    are echoed byte for byte, not the figure (too few connections for one)."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "proxy_cost.py"),
            "--connections",
            "40",
            "--threads",
            "2",
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for case in ("off", "untrusted", "trusted"):
        assert f"{case:9} 40 connections, 0 failed" in out.stdout
