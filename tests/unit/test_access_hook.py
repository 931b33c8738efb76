"""The access log as a close hook, in process: no worker needed to test it."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from echod.config import load_config
from echod.logs import access_log
from echod.scoreboard import Counter
from echod.server.access import close_hook, log_close


@dataclass
class Closing:
    sock: socket.socket
    peer: object = ("192.0.2.7", 40000)
    accepted_at: float = 0.0
    bytes_in: int = 5
    bytes_out: int = 4


def test_no_access_log_means_no_hook() -> None:
    assert close_hook(load_config(cli_overrides={}, environ={})) is None


def test_the_hook_logs_one_line_with_why_the_connection_ended() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    access_log.addHandler(handler)
    level = access_log.level
    access_log.setLevel(logging.INFO)  # as setup_logging() sets it when the log is on
    try:
        with socket.socket() as sock:
            log_close(Closing(sock), Counter.CLOSED_IDLE)
    finally:
        access_log.setLevel(level)
        access_log.removeHandler(handler)
    (record,) = records
    fields = record.fields  # type: ignore[attr-defined]
    assert record.getMessage() == "access"
    assert fields["peer"] == "192.0.2.7:40000"
    assert fields["local"] == "0.0.0.0:0"
    assert (fields["bytes_in"], fields["bytes_out"]) == (5, 4)
    assert fields["reason"] == "idle_timeout"
