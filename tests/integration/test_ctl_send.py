"""echoctl send, and the dispatcher it runs under, tested from the outside."""

from __future__ import annotations

import json
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from support.echo_servers import EchoServer, Misbehaviour, refused_tcp_port, unused_udp_port
from support.echod import ECHOCTL, run_echoctl

PROBE_LINE = re.compile(
    r"^(?P<bytes>\d+) bytes from 127\.0\.0\.1:(?P<port>\d+): seq=(?P<seq>\d+)"
    r"(?: connect=(?P<connect>\d+\.\d{3}) ms)? time=(?P<time>\d+\.\d{3}) ms$"
)
RTT_LINE = re.compile(r"^rtt min/avg/max/mdev = \d+\.\d{3}/\d+\.\d{3}/\d+\.\d{3}/\d+\.\d{3} ms$")


@pytest.fixture(scope="module")
def server() -> Iterator[EchoServer]:
    with EchoServer() as echo_server:
        yield echo_server


def test_three_tcp_probes_print_ping_lines_and_summary(server: EchoServer) -> None:
    result = run_echoctl("send", "-p", server.tcp_port, "-c", 3, "-i", 0.05, "hello")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert len(lines) == 7
    for seq, line in enumerate(lines[:3], start=1):
        match = PROBE_LINE.match(line)
        assert match, line
        assert (match["bytes"], match["seq"], match["connect"]) == ("5", str(seq), None)
    assert lines[3] == ""
    assert lines[4] == f"--- 127.0.0.1:{server.tcp_port} echo statistics ---"
    assert lines[5] == "3 probes sent, 3 received, 0% loss"
    assert RTT_LINE.match(lines[6]), lines[6]


def test_default_is_one_probe_of_text(server: EchoServer) -> None:
    result = run_echoctl("send", "--port", server.tcp_port)
    assert result.returncode == 0
    assert "1 probes sent, 1 received, 0% loss" in result.stdout
    assert len([line for line in result.stdout.splitlines() if PROBE_LINE.match(line)]) == 1


def test_wrong_byte_is_located_and_exits_1() -> None:
    with EchoServer(Misbehaviour(flip_at=5)) as server:
        result = run_echoctl("send", "-p", server.tcp_port, "AAAAAAAAAA")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        "seq=1: wrong reply: first difference at offset 5 (sent 0x41, got 0x61)"
    )
    assert "1 probes sent, 0 received, 100% loss, 1 wrong" in result.stdout


def test_one_bad_probe_among_good_ones_exits_1() -> None:
    # The flip lands in the second probe; the connection is then replaced and
    # the third probe, on a fresh stream, is echoed correctly.
    with EchoServer(Misbehaviour(flip_at=12)) as server:
        result = run_echoctl("send", "-p", server.tcp_port, "-c", 3, "-i", 0, "ABCDEFGHIJ")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert PROBE_LINE.match(lines[0])
    assert lines[1] == "seq=2: wrong reply: first difference at offset 2 (sent 0x43, got 0x63)"
    assert PROBE_LINE.match(lines[2])
    assert "3 probes sent, 2 received, 33.3% loss, 1 wrong" in result.stdout


def test_extra_bytes_after_the_echo_are_wrong() -> None:
    with EchoServer(Misbehaviour(extra=b"!")) as server:
        result = run_echoctl("send", "-p", server.tcp_port, "abc")
    assert result.returncode == 1
    assert "seq=1: wrong reply: 1 extra bytes after the 3 sent" in result.stdout


def test_missing_bytes_are_wrong_not_lost() -> None:
    with EchoServer(Misbehaviour(drop_last_byte=True)) as server:
        result = run_echoctl("send", "-p", server.tcp_port, "-W", 0.3, "abcdef")
    assert result.returncode == 1
    assert "(5 of 6 bytes came back)" in result.stdout


def test_refused_connection_exits_2() -> None:
    blocker, port = refused_tcp_port()
    with blocker:
        result = run_echoctl("send", "-p", port, "-c", 2, "-i", 0)
    assert result.returncode == 2
    assert "seq=1: connect failed: Connection refused" in result.stdout
    assert "2 probes sent, 0 received, 100% loss" in result.stdout
    assert "rtt min" not in result.stdout


def test_server_that_never_answers_exits_2() -> None:
    with EchoServer(Misbehaviour(silent=True)) as server:
        result = run_echoctl("send", "-p", server.tcp_port, "-W", 0.3, "-c", 2, "-i", 0)
    assert result.returncode == 2
    assert result.stdout.startswith("seq=1: timeout after ")


def test_server_that_hangs_up_exits_2() -> None:
    with EchoServer(Misbehaviour(close_on_read=True)) as server:
        result = run_echoctl("send", "-p", server.tcp_port)
    assert result.returncode == 2
    assert "closed by the server after 0 of" in result.stdout


@pytest.mark.parametrize(
    "arguments",
    [
        ["send", "-c", "0"],
        ["send", "-p", "70000"],
        ["send", "-i", "-1"],
        ["send", "--no-such-option"],
        ["send", "-s", "10", "message"],
        ["send", "--udp", "--connect-each"],
        ["send", "--udp", "-s", "70000"],
        ["send", "--json", "-q"],
        ["send", ""],
        ["no-such-command"],
        [],
    ],
)
def test_usage_errors_exit_64_with_one_short_message(arguments: list[str]) -> None:
    result = run_echoctl(*arguments)
    assert result.returncode == 64, result
    assert result.stdout == ""
    assert 1 <= len(result.stderr.splitlines()) <= 2
    assert result.stderr.startswith("echoctl")


def test_json_is_one_document_with_probes_and_summary(server: EchoServer) -> None:
    result = run_echoctl("send", "-p", server.tcp_port, "-c", 2, "-i", 0, "--json", "xyz")
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document["target"] == {
        "host": "127.0.0.1",
        "port": server.tcp_port,
        "protocol": "tcp",
        "address": f"127.0.0.1:{server.tcp_port}",
    }
    assert [p["seq"] for p in document["probes"]] == [1, 2]
    for probe in document["probes"]:
        assert probe["ok"] is True and probe["error"] is None
        assert probe["bytes"] == 3 and probe["rtt_ms"] > 0
    summary = document["summary"]
    assert (summary["sent"], summary["received"], summary["loss_percent"]) == (2, 2, 0)
    assert summary["rtt_ms"]["min"] <= summary["rtt_ms"]["avg"] <= summary["rtt_ms"]["max"]
    assert summary["exit_code"] == 0


def test_json_reports_failures_too() -> None:
    blocker, port = refused_tcp_port()
    with blocker:
        result = run_echoctl("send", "-p", port, "--json")
    assert result.returncode == 2
    document = json.loads(result.stdout)
    assert document["probes"][0]["ok"] is False
    assert "refused" in document["probes"][0]["error"]
    assert document["summary"]["rtt_ms"] is None


def test_quiet_prints_only_the_summary(server: EchoServer) -> None:
    result = run_echoctl("send", "-p", server.tcp_port, "-c", 2, "-i", 0, "-q")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"--- 127.0.0.1:{server.tcp_port} echo statistics ---"
    assert lines[1] == "2 probes sent, 2 received, 0% loss"
    assert len(lines) == 3


def test_connect_each_opens_one_connection_per_probe() -> None:
    with EchoServer() as server:
        result = run_echoctl("send", "-p", server.tcp_port, "-c", 3, "-i", 0, "--connect-each")
        accepted = server.connections_accepted
    assert result.returncode == 0
    probe_lines = [PROBE_LINE.match(line) for line in result.stdout.splitlines()[:3]]
    assert all(match and match["connect"] for match in probe_lines)
    assert accepted == 3


def test_one_connection_serves_all_probes_by_default() -> None:
    with EchoServer() as server:
        result = run_echoctl("send", "-p", server.tcp_port, "-c", 3, "-i", 0)
        accepted = server.connections_accepted
    assert result.returncode == 0
    assert accepted == 1


def test_stdin_payload_is_sent_as_raw_bytes(server: EchoServer) -> None:
    # Binary, NULs, invalid UTF-8 and bigger than any socket buffer.
    payload = bytes(range(256)) * 1200 + b"\x00\xff\xfe"
    result = run_echoctl("send", "-p", server.tcp_port, "-", stdin=payload)
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"{len(payload)} bytes from 127.0.0.1:")


def test_stdin_payload_mismatch_reports_offset() -> None:
    payload = b"\x00" * 100_000
    with EchoServer(Misbehaviour(flip_at=77_777)) as server:
        result = run_echoctl("send", "-p", server.tcp_port, "-", stdin=payload)
    assert result.returncode == 1
    assert "first difference at offset 77777 (sent 0x00, got 0x20)" in result.stdout


def test_random_payload_of_given_size(server: EchoServer) -> None:
    result = run_echoctl("send", "-p", server.tcp_port, "-s", "64K", "--seed", 7, "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["probes"][0]["bytes"] == 65536


def test_udp_probes_carry_a_seq_header(server: EchoServer) -> None:
    result = run_echoctl("send", "-p", server.udp_port, "--udp", "-c", 3, "-i", 0, "-s", 100)
    assert result.returncode == 0, result
    matches = [PROBE_LINE.match(line) for line in result.stdout.splitlines()[:3]]
    assert [(m and m["bytes"], m and m["seq"]) for m in matches] == [
        ("108", "1"),
        ("108", "2"),
        ("108", "3"),
    ]


def test_udp_duplicates_are_reported_and_exit_1() -> None:
    with EchoServer(Misbehaviour(udp_duplicate=True)) as server:
        result = run_echoctl("send", "-p", server.udp_port, "--udp", "-c", 3, "-i", 0.2)
    assert result.returncode == 1
    # The duplicate of seq 1 arrives while waiting out the interval.
    assert re.search(r"^\d+ bytes from .*: seq=1 time=\S+ ms \(DUP!\)$", result.stdout, re.M)
    assert "3 probes sent, 3 received, 0% loss" in result.stdout
    assert re.search(r", \d+ duplicates", result.stdout)


def test_udp_wrong_bytes_are_located() -> None:
    with EchoServer(Misbehaviour(flip_at=10)) as server:
        result = run_echoctl("send", "-p", server.udp_port, "--udp", "AAAA")
    assert result.returncode == 1
    # Offsets count from the start of the datagram: 8 header bytes, then AAAA.
    assert "seq=1: wrong reply: first difference at offset 10 (sent 0x41, got 0x61)" in (
        result.stdout
    )


def test_udp_losses_exit_1() -> None:
    with EchoServer(Misbehaviour(udp_drop_every=2)) as server:
        result = run_echoctl("send", "-p", server.udp_port, "--udp", "-c", 4, "-i", 0, "-W", 0.3)
    assert result.returncode == 1
    assert "4 probes sent, 2 received, 50% loss" in result.stdout
    assert "seq=2: timeout after" in result.stdout


def test_udp_late_reply_is_matched_to_its_probe() -> None:
    # Replies come 0.6 s late, after the 0.2 s timeout but well within the
    # 1.2 s interval in which the next probe is awaited.
    with EchoServer(Misbehaviour(delay_s=0.6)) as server:
        result = run_echoctl("send", "-p", server.udp_port, "--udp", "-c", 2, "-i", 1.2, "-W", 0.2)
    assert result.returncode == 1
    assert re.search(r"seq=1 time=\S+ ms \(late: after its timeout\)$", result.stdout, re.M)
    assert re.search(r"2 probes sent, 0 received, 100% loss, [12] late", result.stdout)


def test_udp_nobody_listening_exits_2() -> None:
    result = run_echoctl("send", "-p", unused_udp_port(), "--udp", "-W", 1)
    assert result.returncode == 2
    assert "seq=1: connection refused" in result.stdout


def test_ctrl_c_prints_the_summary_so_far(server: EchoServer) -> None:
    process = subprocess.Popen(
        [*ECHOCTL, "send", "-p", str(server.tcp_port), "-c", "1000", "-i", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as a shell starts a foreground command: a suite run from a background job
        # (`make test &`, a CI runner) would pass SIGINT on ignored, and Ctrl-C with it
        preexec_fn=_sigint_by_default,
    )
    try:
        first_line = _read_line(process, deadline=time.monotonic() + 20)
        assert PROBE_LINE.match(first_line), first_line
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == 0
    assert "Traceback" not in stderr
    summary = re.search(r"^(\d+) probes sent, (\d+) received, 0% loss$", stdout, re.M)
    assert summary and summary[1] == summary[2]
    assert 1 <= int(summary[1]) < 1000


def _sigint_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _read_line(process: subprocess.Popen[str], *, deadline: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=deadline - time.monotonic()):
                return process.stdout.readline().rstrip("\n")
    raise AssertionError("no output before the deadline")


def test_global_options_before_and_after_the_subcommand(server: EchoServer) -> None:
    result = run_echoctl(
        "--runtime-dir", "/tmp/echoctl-test", "send", "-p", server.tcp_port,
        "--pidfile", "/tmp/echoctl-test/echod.pid", "--runtime-dir", "/tmp/elsewhere",
    )  # fmt: skip
    assert result.returncode == 0, result


def test_version_is_the_installed_one() -> None:
    result = run_echoctl("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"echoctl {metadata.version('echod')}"


@pytest.mark.parametrize("command", ["send", "check", "bench"])
def test_every_subcommand_has_help_with_examples(command: str) -> None:
    result = run_echoctl(command, "--help")
    assert result.returncode == 0
    assert f"usage: echoctl {command}" in result.stdout
    assert "examples:" in result.stdout
    assert "127.0.0.1" in result.stdout or "::1" in result.stdout


def test_console_script_runs(server: EchoServer) -> None:
    script = Path(sys.executable).parent / "echoctl"
    if not script.exists():
        pytest.skip("echoctl console script not installed next to this interpreter")
    completed = subprocess.run(
        [str(script), "send", "-p", str(server.tcp_port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0
    assert "1 probes sent, 1 received, 0% loss" in completed.stdout
