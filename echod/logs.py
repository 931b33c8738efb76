"""Logging: one line per event, each naming the process role (master, worker N) and pid.

Text lines are logfmt-like and journald-friendly; ``log_format = "json"`` gives
one JSON object per line. Files are reopened on USR1 so logrotate can move them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

LOGGER_NAME = "echod"
log = logging.getLogger(LOGGER_NAME)

# syslog priorities, for journald's <N> prefixes when stderr is the journal
_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class _Role:
    """Who is logging: set once per process (master, worker 3, ...)."""

    name = "master"


role = _Role()


def set_role(name: str) -> None:
    role.name = name


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = getattr(record, "fields", None)
    return dict(extra) if isinstance(extra, dict) else {}


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelname, 6)}>" if self.journald else ""
        stamp = "" if self.journald else _timestamp(record) + " "
        line = (f"{prefix}{stamp}{record.levelname:<7} [{role.name} {record.process}] "
                f"{record.getMessage()}")
        extra = _fields(record)
        if extra:
            line += " " + " ".join(f"{k}={_logfmt_value(v)}" for k, v in extra.items())
        if record.exc_info and record.levelno >= logging.ERROR:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "pid": record.process,
            "worker": role.name,
            "msg": record.getMessage(),
        }
        extra = _fields(record)
        if extra:
            document["fields"] = extra
        if record.exc_info and record.levelno >= logging.ERROR:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class ReopenableFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A file handler that re-creates its file on demand (USR1 after logrotate)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> TextIO:
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        self.acquire()
        try:
            fresh = self._open()
            old, self.stream = self.stream, fresh
            old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()
        finally:
            self.release()
        super().close()


def open_log_file(path: str) -> None:
    """Check early (before daemonizing) that the log file can be written."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "a", encoding="utf-8"):
        pass


def setup_logging(level: str = "info", log_file: str = "", log_format: str = "text") -> None:
    """Replace echod's handlers: stderr (default) or a file, in the chosen format."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handler: logging.Handler
    handler = ReopenableFileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    journald = not log_file and bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(journald))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


def flush() -> None:
    for handler in log.handlers:
        handler.flush()


def reopen_log_files() -> None:
    for handler in log.handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


def log_file_descriptors() -> list[int]:
    """File descriptors of open log files (to keep across daemonizing)."""
    fds = []
    for handler in log.handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            try:
                fds.append(stream.fileno())
            except (OSError, ValueError):
                pass
    return fds
