"""echoctl bench: rates, verification of every byte, exit codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from support.echo_servers import EchoServer, Misbehaviour, refused_tcp_port
from support.echod import run_echoctl


@pytest.fixture(scope="module")
def server() -> Iterator[EchoServer]:
    with EchoServer() as echo_server:
        yield echo_server


def bench_json(*arguments: str | int) -> tuple[int, dict[str, Any]]:
    result = run_echoctl("bench", "--json", *arguments)
    assert result.stderr == ""  # progress only ever goes to a terminal
    return result.returncode, json.loads(result.stdout)


def test_request_response_against_a_correct_server(server: EchoServer) -> None:
    code, report = bench_json("-p", server.tcp_port, "-c", 4, "-P", 2, "-d", 1)
    assert code == 0, report
    assert report["completed"] > 0
    assert report["rate_per_s"] > 0 and report["mb_per_s"] > 0
    assert report["rate_unit"] == "round trips/s"
    assert (report["errors"], report["mismatches"]) == (0, 0)
    assert report["connected"] == 4 and report["processes"] == 2
    # Every byte of every completed round trip came back verified.
    assert report["bytes_echoed"] >= report["completed"] * 64
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"]
    assert latency["p99.9"] <= latency["max"]


def test_stream_mode_against_a_correct_server(server: EchoServer) -> None:
    code, report = bench_json(
        "-p", server.tcp_port, "--mode", "stream", "-s", "4K", "-c", 2, "-d", 1
    )
    assert code == 0, report
    assert report["rate_unit"] == "chunks/s"
    assert report["completed"] > 0 and report["mb_per_s"] > 0
    assert report["mismatches"] == 0


def test_messages_larger_than_one_read(server: EchoServer) -> None:
    code, report = bench_json("-p", server.tcp_port, "-s", "200K", "-c", 2, "-d", 0.5)
    assert code == 0, report
    assert report["completed"] > 0 and report["mismatches"] == 0


def test_table_output(server: EchoServer) -> None:
    result = run_echoctl("bench", "-p", server.tcp_port, "-c", 2, "-d", 0.5)
    assert result.returncode == 0
    labels = [line.split("  ")[0] for line in result.stdout.splitlines()]
    for label in ("round trips/s", "MB/s", "latency ms", "errors", "mismatches"):
        assert label in labels
    latency_line = next(line for line in result.stdout.splitlines() if line.startswith("latency"))
    for name in ("p50", "p90", "p99", "p99.9", "max"):
        assert f" {name} " in latency_line
    assert result.stdout.splitlines()[-1].split() == ["mismatches", "0"]


@pytest.mark.parametrize("mode", ["rr", "stream"])
def test_a_corrupting_server_is_caught(mode: str) -> None:
    with EchoServer(Misbehaviour(flip_every=5000)) as server:
        code, report = bench_json(
            "-p", server.tcp_port, "--mode", mode, "-s", "1K", "-c", 3, "-d", 1
        )
    assert code == 1
    assert report["mismatches"] == 3  # every connection, each closed at its first bad byte
    assert "first difference at offset 4999" in report["error_samples"][0]


def test_nothing_to_connect_to_exits_2() -> None:
    blocker, port = refused_tcp_port()
    with blocker:
        code, report = bench_json("-p", port, "-c", 3, "-d", 1)
    assert code == 2
    assert report["completed"] == 0 and report["errors"] == 3
    assert "Connection refused" in report["error_samples"][0]


def test_server_that_never_answers_exits_2() -> None:
    with EchoServer(Misbehaviour(silent=True)) as server:
        code, report = bench_json("-p", server.tcp_port, "-c", 2, "-d", 1.5, "-W", 0.2)
    assert code == 2
    assert report["completed"] == 0
    assert report["errors"] == 2
    assert "no echo for 0.2 s" in report["error_samples"][0]


@pytest.mark.parametrize(
    "arguments", [["-c", "0"], ["-d", "0"], ["--mode", "flood"], ["-s", "0"], ["-P", "x"]]
)
def test_usage_errors_exit_64(arguments: list[str]) -> None:
    result = run_echoctl("bench", *arguments)
    assert result.returncode == 64
    assert result.stderr.startswith("echoctl bench: error:")
