"""echoctl check: the Nagios/Icinga plugin contract (one line, perfdata, exit 0-3)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from support.echo_servers import EchoServer, Misbehaviour, refused_tcp_port
from support.echod import run_echoctl

OK_LINE = re.compile(
    r"^ECHO OK - 3/3 echoed, rtt avg (?P<avg>\d+\.\d{3}) ms"
    r" \| rtt=(?P=avg)ms;50;100;0 loss=0%;20;60$"
)


@pytest.fixture(scope="module")
def server() -> Iterator[EchoServer]:
    with EchoServer() as echo_server:
        yield echo_server


def check(*arguments: str | int) -> tuple[int, str]:
    """Run the plugin; return its exit code and its one line of output."""
    result = run_echoctl("check", *arguments)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return result.returncode, lines[0]


def test_healthy_server_is_ok_with_perfdata(server: EchoServer) -> None:
    code, line = check("-H", "127.0.0.1", "-p", server.tcp_port)
    assert code == 0
    assert OK_LINE.match(line), line


def test_udp_healthy_server_is_ok(server: EchoServer) -> None:
    code, line = check("-H", "127.0.0.1", "-p", server.udp_port, "--udp", "-n", 2)
    assert code == 0
    assert line.startswith("ECHO OK - 2/2 echoed, rtt avg ")


def test_rtt_above_warning_is_warning(server: EchoServer) -> None:
    # Any real round trip takes more than 0 ms, and none takes 100 s.
    code, line = check("-H", "127.0.0.1", "-p", server.tcp_port, "-w", 0, "-c", 100000)
    assert code == 1
    assert line.startswith("ECHO WARNING - 3/3 echoed, rtt avg ")
    assert "(rtt > 0 ms)" in line
    assert re.search(r"\| rtt=\d+\.\d{3}ms;0;100000;0 loss=0%;20;60$", line)


def test_rtt_above_critical_is_critical(server: EchoServer) -> None:
    code, line = check("-H", "127.0.0.1", "-p", server.tcp_port, "-w", 0, "-c", 0)
    assert code == 2
    assert line.startswith("ECHO CRITICAL - 3/3 echoed")
    assert "(rtt > 0 ms)" in line


def test_loss_above_warning_is_warning() -> None:
    with EchoServer(Misbehaviour(udp_drop_every=2)) as server:
        code, line = check("-H", "127.0.0.1", "-p", server.udp_port, "--udp", "-n", 4, "-t", 2)
    assert code == 1
    assert line.startswith("ECHO WARNING - 2/4 echoed")
    assert "loss 50% > 20%" in line
    assert line.endswith(" loss=50%;20;60")


def test_loss_above_critical_is_critical() -> None:
    with EchoServer(Misbehaviour(udp_drop_every=2)) as server:
        code, line = check(
            "-H", "127.0.0.1", "-p", server.udp_port, "--udp", "-n", 4, "-t", 2,
            "--loss-warn", 10, "--loss-crit", 40,
        )  # fmt: skip
    assert code == 2
    assert "loss 50% > 40%" in line
    assert line.endswith(" loss=50%;10;40")


def test_wrong_bytes_are_critical() -> None:
    with EchoServer(Misbehaviour(flip_at=3)) as server:
        code, line = check("-H", "127.0.0.1", "-p", server.tcp_port)
    assert code == 2
    assert line.startswith("ECHO CRITICAL - 0/3 echoed (wrong bytes echoed")
    assert "first difference at offset 3" in line
    assert "| rtt=U;50;100;0 loss=100%;20;60" in line


def test_refused_connection_is_critical() -> None:
    blocker, port = refused_tcp_port()
    with blocker:
        code, line = check("-H", "127.0.0.1", "-p", port)
    assert code == 2
    assert line.startswith("ECHO CRITICAL - 0/3 echoed (no echo")
    assert "Connection refused" in line


def test_silent_server_is_critical_within_the_timeout() -> None:
    with EchoServer(Misbehaviour(silent=True)) as server:
        code, line = check("-H", "127.0.0.1", "-p", server.tcp_port, "-n", 2, "-t", 0.6)
    assert code == 2
    assert "timeout after" in line


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        ["-H", "127.0.0.1"],
        ["-p", "7007"],
        ["-H", "127.0.0.1", "-p", "7007", "-w", "fast"],
        ["-H", "127.0.0.1", "-p", "7007", "--loss-crit", "60:20"],
        ["-H", "127.0.0.1", "-p", "7007", "-c", "10:abc"],
        ["-H", "127.0.0.1", "-p", "7007", "-w", "@"],
        ["-H", "127.0.0.1", "-p", "7007", "-w", "1e999"],
        ["-H", "127.0.0.1", "-p", "7007", "-w", "100", "-c", "50"],
        ["-H", "127.0.0.1", "-p", "7007", "--no-such-option"],
    ],
)
def test_usage_errors_are_unknown(arguments: list[str]) -> None:
    code, line = check(*arguments)
    assert code == 3
    assert line.startswith("ECHO UNKNOWN - ")


def test_perfdata_numbers_are_plain_decimals(server: EchoServer) -> None:
    # Python's own spelling of these is 1e-05 and 1e+06; the guidelines allow [-0-9.].
    code, line = check("-H", "127.0.0.1", "-p", server.tcp_port, "-w", "0.00001", "-c", "1e6")
    assert code == 1
    perfdata = line.split(" | ", 1)[1]
    assert re.fullmatch(r"rtt=\d+\.\d{3}ms;0\.00001;1000000;0 loss=0%;20;60", perfdata), line
    assert "(rtt > 0.00001 ms)" in line


@pytest.mark.parametrize(
    ("warning", "critical", "expected_code", "reason"),
    [
        ("~:100000", "100000", 0, None),  # above 100 s: never on loopback
        ("100000:", "~:100000", 1, "(rtt outside 100000: ms)"),  # below 100 s: always
        ("@0:100000", "100000", 1, "(rtt inside 0:100000 ms)"),
        ("100000", "@0:100000", 2, "(rtt inside 0:100000 ms)"),
        ("100000:200000", "200000", 1, "(rtt outside 100000:200000 ms)"),
    ],
)
def test_threshold_ranges_in_the_guidelines_syntax(
    server: EchoServer, warning: str, critical: str, expected_code: int, reason: str | None
) -> None:
    code, line = check("-H", "127.0.0.1", "-p", server.tcp_port, "-w", warning, "-c", critical)
    assert code == expected_code, line
    if reason is not None:
        assert reason in line
    # The thresholds come back in range syntax, as given.
    assert f"ms;{warning};{critical};0 loss=0%;20;60" in line


def test_loss_ranges() -> None:
    with EchoServer(Misbehaviour(udp_drop_every=2)) as server:
        code, line = check(
            "-H", "127.0.0.1", "-p", server.udp_port, "--udp", "-n", 4, "-t", 2,
            "--loss-warn", "@40:60", "--loss-crit", "~:90",
        )  # fmt: skip
    assert code == 1
    assert "loss 50% inside 40:60%" in line
    assert line.endswith(" loss=50%;@40:60;~:90")


def test_help_says_the_units() -> None:
    result = run_echoctl("check", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "in milliseconds" in text and "check_tcp's -w/-c are in seconds" in text
    assert "-t is in seconds" in text
    assert "@10:20 inside 10..20" in text
