"""Logging: one line per event, each naming the process role (master, worker N) and pid.

Text lines are logfmt-like and journald-friendly; ``log_format = "json"`` gives
one JSON object per line. Files are reopened on USR1 so logrotate can move them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from echod.errors import EchodError

LOGGER_NAME = "echod"
log = logging.getLogger(LOGGER_NAME)
# One line per finished connection. Its own handler (file or stderr) and level:
# turning the error log down to "warning" must not silence the access log.
ACCESS_LOGGER_NAME = "echod.access"
access_log = logging.getLogger(ACCESS_LOGGER_NAME)

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
        line = (
            f"{prefix}{stamp}{record.levelname:<7} [{role.name} {record.process}] "
            f"{record.getMessage()}"
        )
        extra = _fields(record)
        if extra:
            line += " " + " ".join(f"{k}={_logfmt_value(v)}" for k, v in extra.items())
        if record.exc_info and record.levelno >= logging.ERROR:
            trace = self.formatException(record.exc_info)
            if self.journald:  # journald reads each line as an entry: keep its priority
                trace = trace.replace("\n", "\n" + prefix)
                line += "\n" + prefix + trace
            else:
                line += "\n" + trace
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


# Directories (the runtime directory) where a log file is never opened through a symlink.
_private_dirs: set[str] = set()


def never_follow_symlinks_in(directory: str) -> None:
    """Open log files in ``directory`` with O_NOFOLLOW (elsewhere a symlink is the operator's)."""
    _private_dirs.add(os.path.abspath(directory))


def _nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


class ReopenableFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A file handler that re-creates its file on demand (USR1 after logrotate).

    A write that fails (disk full, file system gone read-only, ...) drops the
    line and is reported once on stderr, not per line with a traceback as
    logging does by default; the first line that gets through again, or a
    reopen, says how many were dropped.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.dropped = 0  # lines lost since writing started to fail
        super().__init__(self._open())

    def _open(self) -> TextIO:
        private = os.path.dirname(os.path.abspath(self.path)) in _private_dirs
        opener = _nofollow_opener if private else None
        return open(self.path, "a", encoding="utf-8", buffering=1, opener=opener)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)  # a bad record: logging's own report
            return
        self.acquire()
        try:
            self._write(line)
        finally:
            self.release()

    def _write(self, line: str) -> None:
        try:
            if self.dropped:
                self.stream.write(self._recovered_line())
            self.stream.write(line)
            self.stream.flush()
        except OSError as exc:
            self._failed(exc)
            return
        self.dropped = 0

    def _recovered_line(self) -> str:
        return f"echod: log file writable again; {self.dropped} line(s) were dropped\n"

    def _failed(self, exc: OSError) -> None:
        if not self.dropped:
            _report(f"cannot write log file {self.path}: {exc.strerror or exc}; dropping lines")
        self.dropped += 1

    def flush(self) -> None:
        self.acquire()
        try:
            self.stream.flush()
        except OSError as exc:
            self._failed(exc)
        finally:
            self.release()

    def reopen(self) -> None:
        self.acquire()
        try:
            try:
                fresh = self._open()
            except OSError as exc:  # keep the old stream: better than nothing
                _report(f"cannot reopen log file {self.path}: {exc.strerror or exc}")
                return
            old, self.stream = self.stream, fresh
            with contextlib.suppress(OSError):  # its unwritten tail is lost
                old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            with contextlib.suppress(OSError):
                self.stream.close()
        finally:
            self.release()
        super().close()


def _report(problem: str) -> None:
    """One line on stderr about the log itself (the log cannot carry it)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"echod [{role.name} {os.getpid()}]: {problem}\n")
        sys.stderr.flush()


def setup_logging(
    level: str = "info", log_file: str = "", log_format: str = "text", access_log_path: str = ""
) -> None:
    """Replace echod's handlers: stderr (default) or a file, in the chosen format; and the
    access log's ("" = off, "-" = stderr), in the same format.

    All or nothing: if a file cannot be opened, EchodError says which and the
    handlers in place stay (a reload keeps logging where it did).
    """
    main = _make_handler(log_file, log_format)
    try:
        access = _make_handler(access_log_path, log_format) if access_log_path else None
    except EchodError:
        main.close()
        raise
    _install(log, main)
    log.setLevel(level.upper())
    log.propagate = False
    _install(access_log, access)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False  # never into the error log, whatever its level


def settings_of(config: Any) -> tuple[str, str, str, str]:
    """The arguments of :func:`setup_logging` a config asks for (compared on reload)."""
    return (config.log_level, config.log_file, config.log_format, config.access_log)


def _make_handler(path: str, log_format: str) -> logging.Handler:
    """A handler for `path` ("" or "-" = stderr) in the given format."""
    to_stderr = not path or path == "-"
    handler: logging.Handler
    if to_stderr:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = ReopenableFileHandler(path)
        except OSError as exc:
            raise EchodError(f"cannot open log file {path}: {exc.strerror or exc}") from None
    journald = to_stderr and bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(journald))
    return handler


def _install(logger: logging.Logger, handler: logging.Handler | None) -> None:
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    if handler is not None:
        logger.addHandler(handler)


def _handlers() -> list[logging.Handler]:
    return [*log.handlers, *access_log.handlers]


def flush() -> None:
    for handler in log.handlers:
        handler.flush()


def reopen_log_files() -> None:
    """USR1: re-create moved files (the error log and the access log)."""
    for handler in _handlers():
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


def stack_dump_path(directory: str, pid: int) -> str:
    """Where a worker's faulthandler writes its stacks on SIGABRT."""
    return os.path.join(directory, f"echod-worker-{pid}.stack")


def report_stack_dump(directory: str, pid: int, who: str) -> None:
    """Log (as one line, in the log format) and remove the stack dump a dead worker left."""
    path = stack_dump_path(directory, pid)
    try:
        # Never through a symlink (it could point at any file the master may read)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, encoding="utf-8", errors="replace") as handle:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            text = handle.read(1 << 20) if regular else ""
        os.unlink(path)
    except OSError:
        return
    if text.strip():
        log.error(
            "%s (pid %d) was aborted; its stacks follow",
            who,
            pid,
            extra={"fields": {"stack": text.rstrip()}},
        )


def log_file_descriptors() -> list[int]:
    """File descriptors of open log files (to keep across daemonizing); the error log first."""
    fds = []
    for handler in _handlers():
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            try:
                fds.append(stream.fileno())
            except (OSError, ValueError):
                pass
    return fds


@dataclass
class _Window:
    opened: float
    suppressed: int = 0
    # the latest suppressed occurrence, logged by flush() when the window ends quietly
    last: tuple[int, str, tuple[Any, ...], dict[str, Any]] | None = None


@dataclass
class RateLimitedLog:
    """Logs a repeated message at most once per ``interval`` seconds per key.

    The first occurrence is logged at once; later ones within the interval are
    only counted. The next line logged for that key (a fresh occurrence after the
    interval, or :meth:`flush` once it has passed) carries ``suppressed=N``: how
    many occurrences were not logged on their own. Not thread-safe (one per loop).
    """

    logger: logging.Logger
    interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 64
    windows: dict[str, _Window] = field(default_factory=dict)

    def log(
        self,
        level: int,
        msg: str,
        *args: Any,
        key: str | None = None,
        fields: dict[str, Any] | None = None,
    ) -> bool:
        """Log unless suppressed; return whether a line was written."""
        now = self.clock()
        key = msg if key is None else key
        window = self.windows.get(key)
        if window is not None and now - window.opened < self.interval:
            window.suppressed += 1
            window.last = (level, msg, args, dict(fields or {}))
            return False
        self._emit(level, msg, args, dict(fields or {}), window.suppressed if window else 0)
        self.windows.pop(key, None)
        self.windows[key] = _Window(now)
        while len(self.windows) > self.max_keys:  # bounded: forget the oldest key
            del self.windows[next(iter(self.windows))]
        return True

    def flush(self) -> None:
        """Report occurrences held back by windows that have ended (call it now and then)."""
        if not self.windows:
            return
        now = self.clock()
        for key, window in list(self.windows.items()):
            if now - window.opened < self.interval:
                continue
            if window.suppressed and window.last is not None:
                level, msg, args, extra = window.last
                self._emit(level, msg, args, extra, window.suppressed)
                # a fresh window: a steady stream still yields one line per interval
                self.windows[key] = _Window(now)
            else:
                del self.windows[key]

    def _emit(
        self, level: int, msg: str, args: tuple[Any, ...], extra: dict[str, Any], suppressed: int
    ) -> None:
        if suppressed:
            extra["suppressed"] = suppressed
        self.logger.log(level, msg, *args, extra={"fields": extra} if extra else None)
