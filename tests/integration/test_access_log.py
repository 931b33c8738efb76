"""The access log: one line per finished connection, text or JSON, reopened on USR1."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
from pathlib import Path

from support.echod import echo_roundtrip, recv_until_eof, wait_until

TEXT_LINE = re.compile(
    r"^\S+Z INFO +\[worker (?P<worker>\d+) (?P<pid>\d+)\] access (?P<fields>.*)$"
)


def _text_fields(line: str) -> dict[str, str]:
    match = TEXT_LINE.match(line)
    assert match, f"not an access line: {line!r}"
    return dict(pair.split("=", 1) for pair in match.group("fields").split(" "))


def _access_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def _line_for(path: Path, peer: str) -> dict[str, str] | None:
    """The fields of the access line for `peer`, once it has been written."""
    for line in _access_lines(path):
        fields = _text_fields(line)
        if fields["peer"] == peer:
            return fields
    return None


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def test_a_line_per_connection_with_bytes_and_client_eof(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = start_echod(workers=2, config={"access_log": str(access)})
    payloads = [b"x" * 5, b"\0binary\xff" * 1000, b"y" * (1 << 20)]
    peers = []
    for payload in payloads:
        with server.connect() as sock:
            assert echo_roundtrip(sock, payload) == payload
            peers.append(_name(sock))
    for peer, payload in zip(peers, payloads, strict=True):
        fields = wait_until(
            lambda peer=peer: _line_for(access, peer), 10, message=f"the access line of {peer}"
        )
        assert fields["bytes_in"] == str(len(payload)), fields
        assert fields["bytes_out"] == str(len(payload)), fields
        assert fields["reason"] == "client_eof"
        assert fields["local"] == f"127.0.0.1:{server.port}"
        assert float(fields["duration"]) >= 0
    assert all(line.startswith("20") for line in _access_lines(access))
    # the error log stays free of access lines
    assert " access peer=" not in server.output


def test_half_close_then_eof_counts_everything_echoed(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = start_echod(config={"access_log": str(access)})
    # more than the kernel buffers: the worker holds bytes back and stops reading at times
    payload = bytes(range(256)) * 12_000

    def send_then_half_close(sock: socket.socket) -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    with server.connect() as sock:
        sender = threading.Thread(target=send_then_half_close, args=(sock,), daemon=True)
        sender.start()
        assert recv_until_eof(sock, timeout=30) == payload
        sender.join(10)
        peer = _name(sock)
    fields = wait_until(lambda: _line_for(access, peer), 10, message="the access line")
    assert (fields["bytes_in"], fields["bytes_out"], fields["reason"]) == (
        str(len(payload)),
        str(len(payload)),
        "client_eof",
    )


def test_idle_timeout_is_the_reason(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = start_echod(config={"access_log": str(access), "idle_timeout": 1})
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"abc") == b"abc"
        sock.settimeout(15)
        assert sock.recv(1) == b""  # the server closed it
        peer = _name(sock)
    fields = wait_until(lambda: _line_for(access, peer), 10, message="the access line")
    assert fields["reason"] == "idle_timeout"
    assert (fields["bytes_in"], fields["bytes_out"]) == ("3", "3")
    assert float(fields["duration"]) >= 1.0


def test_shutdown_closes_are_logged(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = start_echod(config={"access_log": str(access)})
    sock = server.connect()
    assert echo_roundtrip(sock, b"open") == b"open"
    peer = _name(sock)
    server.send_signal(signal.SIGINT)  # fast stop: open connections are closed now
    assert server.wait(30) == 0
    fields = _line_for(access, peer)
    assert fields is not None and fields["reason"] == "shutdown", _access_lines(access)
    sock.close()


def test_json_access_log(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.json"
    server = start_echod("--log-format", "json", config={"access_log": str(access)})
    port = next(
        int(m.group(1))
        for line in server.lines
        if (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line))
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert echo_roundtrip(sock, b"hello json") == b"hello json"
        peer = _name(sock)
    lines = wait_until(lambda: _access_lines(access), 10, message="an access line")
    document = json.loads(lines[0])
    assert document["msg"] == "access"
    assert document["worker"] == "worker 1"
    assert document["fields"]["peer"] == peer
    assert document["fields"]["local"] == f"127.0.0.1:{port}"
    assert document["fields"]["bytes_in"] == document["fields"]["bytes_out"] == 10
    assert document["fields"]["reason"] == "client_eof"
    assert isinstance(document["fields"]["duration"], float)


def test_access_log_to_stderr(start_echod) -> None:
    server = start_echod("--access-log", "-")
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"to stderr") == b"to stderr"
        peer = _name(sock)
    server.wait_for_log(
        rf"access peer={re.escape(peer)} .* bytes_in=9 bytes_out=9 "
        r"reason=client_eof"
    )


def test_unix_socket_connections(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    path = tmp_path / "echo.sock"
    server = start_echod(bind=[f"unix:{path}"], config={"access_log": str(access)})
    assert server.addresses
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        assert echo_roundtrip(sock, b"local") == b"local"
    fields = wait_until(lambda: _line_for(access, "unix"), 10, message="the access line")
    assert fields["local"] == f"unix:{path}"
    assert fields["bytes_in"] == "5"


def test_usr1_reopens_a_moved_access_log(start_echod, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = start_echod(workers=2, config={"access_log": str(access)})
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"before") == b"before"
    wait_until(lambda: _access_lines(access), 10, message="the first access line")
    rotated = tmp_path / "access.log.1"
    access.rename(rotated)
    mark = server.mark()
    server.send_signal(signal.SIGUSR1)
    server.wait_for_log("reopening log files", start=mark)

    def served_into_new_file() -> bool:
        # a worker may still be about to handle its USR1: keep connecting until a line lands
        with server.connect() as sock:
            assert echo_roundtrip(sock, b"after") == b"after"
        return bool(_access_lines(access))

    wait_until(served_into_new_file, 10, interval=0.1, message="a line in the new access log")
    assert all("bytes_in=5 " in line for line in _access_lines(access))
    assert "bytes_in=6 " in _access_lines(rotated)[0]
