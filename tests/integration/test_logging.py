"""Log formats (text, JSON, journald) and the rate limiter for repeated errors."""

from __future__ import annotations

import json
import logging
import os
import re
import signal

import psutil
import pytest
from support.echod import echo_roundtrip

from echod.logs import JsonFormatter, RateLimitedLog, TextFormatter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected() -> tuple[logging.Logger, Collect]:
    logger = logging.getLogger("test.ratelimit")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = Collect()
    logger.handlers = [handler]
    return logger, handler


def _suppressed(record: logging.LogRecord) -> int:
    return getattr(record, "fields", {}).get("suppressed", 0)


def test_rate_limiter_logs_once_per_interval_and_counts_the_rest(collected) -> None:
    logger, handler = collected
    clock = FakeClock()
    limited = RateLimitedLog(logger, interval=10.0, clock=clock)
    assert limited.log(logging.WARNING, "out of fds (%s)", "EMFILE")
    for _ in range(5):
        clock.now += 1
        assert not limited.log(logging.WARNING, "out of fds (%s)", "EMFILE")
    assert len(handler.records) == 1
    assert _suppressed(handler.records[0]) == 0
    clock.now += 10  # the window is over: the next occurrence is logged with the count
    assert limited.log(logging.WARNING, "out of fds (%s)", "EMFILE")
    assert len(handler.records) == 2
    assert handler.records[1].getMessage() == "out of fds (EMFILE)"
    assert _suppressed(handler.records[1]) == 5
    assert handler.records[1].levelno == logging.WARNING


def test_rate_limiter_keys_are_independent(collected) -> None:
    logger, handler = collected
    clock = FakeClock()
    limited = RateLimitedLog(logger, interval=10.0, clock=clock)
    assert limited.log(logging.WARNING, "accept failed: %s", "a", key="accept 1")
    assert limited.log(logging.WARNING, "accept failed: %s", "b", key="accept 2")
    assert not limited.log(logging.WARNING, "accept failed: %s", "a", key="accept 1")
    assert [r.getMessage() for r in handler.records] == ["accept failed: a", "accept failed: b"]


def test_rate_limiter_flush_reports_a_quiet_end(collected) -> None:
    logger, handler = collected
    clock = FakeClock()
    limited = RateLimitedLog(logger, interval=10.0, clock=clock)
    limited.log(logging.ERROR, "boom %d", 1)
    limited.log(logging.ERROR, "boom %d", 2)
    limited.log(logging.ERROR, "boom %d", 3)
    limited.flush()  # the window is still open: nothing yet
    assert len(handler.records) == 1
    clock.now += 10
    limited.flush()
    assert len(handler.records) == 2
    assert handler.records[1].getMessage() == "boom 3"  # the latest occurrence
    assert _suppressed(handler.records[1]) == 2
    # a steady stream still gives one line per interval, not two
    clock.now += 1
    assert not limited.log(logging.ERROR, "boom %d", 4)
    clock.now += 10
    limited.flush()
    assert len(handler.records) == 3
    clock.now += 10
    limited.flush()  # nothing was held back: silent, and the key is forgotten
    assert len(handler.records) == 3
    assert not limited.windows


def test_rate_limiter_keeps_a_bounded_number_of_keys(collected) -> None:
    logger, _ = collected
    limited = RateLimitedLog(logger, interval=10.0, clock=FakeClock(), max_keys=8)
    for index in range(100):
        limited.log(logging.INFO, "message %d", index, key=str(index))
    assert len(limited.windows) == 8


def _record(msg: str, level: int = logging.INFO, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("echod.test", level, __file__, 1, msg, (), None)
    if fields:
        record.fields = fields  # type: ignore[attr-defined]
    return record


def test_json_formatter_includes_fields_and_tracebacks() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        import sys

        record = _record("it failed", logging.ERROR, peer="127.0.0.1:1")
        record.exc_info = sys.exc_info()
    document = json.loads(JsonFormatter().format(record))
    assert {"ts", "level", "pid", "worker", "msg", "fields", "exc"} <= document.keys()
    assert document["level"] == "error"
    assert document["fields"] == {"peer": "127.0.0.1:1"}
    assert "ValueError: bad thing" in document["exc"]


def test_text_formatter_for_journald_prefixes_every_line() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        import sys

        record = _record("it failed", logging.ERROR, key="a b")
        record.exc_info = sys.exc_info()
    lines = TextFormatter(journald=True).format(record).splitlines()
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines), lines
    assert lines[0].endswith('key="a b"')


# -- the real server ---------------------------------------------------------------------


def _port_from_json(server) -> int:
    for line in server.lines:
        document = json.loads(line)
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)", document["msg"])
        if match:
            return int(match.group(1))
    raise AssertionError("no listener logged")


def test_every_line_is_json_with_log_format_json(start_echod) -> None:
    server = start_echod(
        "--log-format", "json", workers=2, config={"idle_timeout": 1, "access_log": "-"}
    )
    port = _port_from_json(server)
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert echo_roundtrip(sock, b"json please") == b"json please"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        idle.settimeout(10)
        assert idle.recv(1) == b""  # closed by the idle timeout: an access line
    workers = server.wait_workers(2)
    psutil.Process(workers[0]).kill()  # an error line from the master
    workers = server.wait_workers(2, exclude={workers[0]})
    # what the master does to a hung worker: SIGABRT makes it dump its stacks
    os.kill(workers[0], signal.SIGABRT)
    server.wait_for_log(rf"pid {workers[0]}\) was aborted; its stacks follow")
    server.wait_workers(2, exclude={workers[0]})
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"generation \d+ serving", start=mark)
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    documents = []
    for line in server.lines:
        try:
            documents.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not JSON: {line!r}") from None
    for document in documents:
        assert {"ts", "level", "pid", "worker", "msg"} <= document.keys(), document
    roles = {document["worker"] for document in documents}
    assert "master" in roles and any(role.startswith("worker") for role in roles), roles
    assert any(d["level"] == "error" and "SIGKILL" in d["msg"] for d in documents)
    stacks = [d["fields"]["stack"] for d in documents if "stack" in d.get("fields", {})]
    assert len(stacks) == 1 and 'File "' in stacks[0], stacks
    assert not list(server.runtime_dir.glob("*.stack"))  # the master cleans up after workers
    reasons = {d.get("fields", {}).get("reason") for d in documents if d["msg"] == "access"}
    assert {"client_eof", "idle_timeout"} <= reasons, reasons


def test_text_lines_carry_journald_priorities_under_systemd(start_echod) -> None:
    server = start_echod(env={"JOURNAL_STREAM": "8:12345"})
    with server.connect() as sock:
        assert echo_roundtrip(sock, b"journal") == b"journal"
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert server.lines
    for line in server.lines:
        assert re.match(
            r"<[0-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) +\[(master|worker \d+) \d+\] ", line
        ), line


def test_text_lines_are_logfmt_like_without_journald(start_echod) -> None:
    server = start_echod()
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    for line in server.lines:
        assert re.match(
            stamp + r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\[(master|worker \d+) "
            r"\d+\] ",
            line,
        ), line
