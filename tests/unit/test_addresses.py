"""host:port spelling shared by echod's logs, echoctl and socket activation."""

from __future__ import annotations

import pytest

from echod.addresses import format_host_port, parse_address


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 7007, "127.0.0.1:7007"),
        ("localhost", 7, "localhost:7"),
        ("::1", 7007, "[::1]:7007"),
        ("fe80::1%lo", 7, "[fe80::1%lo]:7"),
        ("::ffff:127.0.0.1", 9, "[::ffff:127.0.0.1]:9"),
    ],
)
def test_ipv6_hosts_get_brackets(host: str, port: int, text: str) -> None:
    assert format_host_port(host, port) == text


@pytest.mark.parametrize("text", ["127.0.0.1:7007", "[::1]:7", "udp://[::]:7", "udp://0.0.0.0:7"])
def test_formatting_round_trips_through_parsing(text: str) -> None:
    assert str(parse_address(text)) == text
