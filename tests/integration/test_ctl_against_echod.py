"""echoctl send, check and bench against the real echod, TCP and UDP."""

from __future__ import annotations

import json

from support.echod import free_port, run_echoctl


def test_send_check_and_bench_against_echod(start_echod) -> None:
    udp_port = free_port(kind=2)  # SOCK_DGRAM
    server = start_echod(workers=2, bind=["127.0.0.1:0", f"udp://127.0.0.1:{udp_port}"])
    port = str(server.port)
    tcp = run_echoctl("send", "-p", port, "-c", "3", "-i", "0.05", "-s", "1000")
    assert tcp.returncode == 0, tcp.stdout + tcp.stderr
    assert tcp.stdout.count(f"1000 bytes from 127.0.0.1:{port}: seq=") == 3
    assert "3 probes sent, 3 received, 0% loss" in tcp.stdout
    each = run_echoctl("send", "-p", port, "-c", "2", "-i", "0.05", "--connect-each", "--json")
    assert each.returncode == 0
    document = json.loads(each.stdout)
    assert document["summary"]["received"] == 2
    udp = run_echoctl("send", "--udp", "-p", str(udp_port), "-c", "3", "-i", "0.05", "hello")
    assert udp.returncode == 0, udp.stdout + udp.stderr
    assert "3 probes sent, 3 received, 0% loss" in udp.stdout
    check = run_echoctl("check", "-H", "127.0.0.1", "-p", port)
    assert check.returncode == 0, check.stdout
    assert check.stdout.startswith("ECHO OK - 3/3 echoed") and "| rtt=" in check.stdout
    bench = run_echoctl("bench", "-p", port, "-c", "8", "-s", "256", "-d", "1", "-P", "1", "--json")
    assert bench.returncode == 0, bench.stdout + bench.stderr
    result = json.loads(bench.stdout)
    flat = json.dumps(result)
    assert '"mismatches": 0' in flat
    assert any(v > 0 for k, v in _numbers(result) if "per_s" in k or "rate" in k), flat[:500]


def test_send_to_a_stopped_echod_exits_2(start_echod) -> None:
    server = start_echod(workers=1)
    port = str(server.port)
    server.send_signal(15)
    assert server.wait(20) == 0
    result = run_echoctl("send", "-p", port, "-W", "1")
    assert result.returncode == 2


def _numbers(document: object, prefix: str = ""):
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _numbers(value, f"{prefix}.{key}")
    elif isinstance(document, list):
        for value in document:
            yield from _numbers(value, prefix)
    elif isinstance(document, int | float) and not isinstance(document, bool):
        yield prefix, document
