"""Daemon mode: detach with python-daemon, but let the launching command report the outcome.

The command a user types (``echod`` without ``--foreground``) must return 0 only once
the daemon serves, or print the daemon's error and exit with its code. So:

1. The caller validates the config, takes the pidfile lock and binds every socket in
   the foreground, where errors still reach the terminal.
2. ``launch_daemon()`` creates a readiness pipe, then forks. The parent (the launcher)
   waits on the pipe and never returns: it ``os._exit()``\\ s with the daemon's verdict.
   The child enters ``daemon.DaemonContext`` (double fork, new session, fds closed
   except ``files_preserve``, stdio on /dev/null) and returns a ``ReadinessReporter``.
3. The daemon writes its pid to the pidfile, starts its workers and calls
   ``reporter.ready()``; or, if it cannot start, ``reporter.failed(code, message)``
   and exits with that code.

Constraints: call it with no threads running (it forks); python-daemon closes every
fd not in ``files_preserve`` (so (re)open log files after it, or preserve them); the
daemon's signal handlers are left alone (``signal_map={}``): the master installs its
own, python-daemon's defaults would turn TERM into SystemExit and ignore TTIN/TTOU.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from typing import IO, NoReturn

from echod import exitcodes

DEFAULT_READY_TIMEOUT_SECONDS = 30.0
# One record per write, below PIPE_BUF, so it reaches the launcher in one piece.
_MAX_RECORD_BYTES = 3000
_READY = "READY"
_ERROR = "ERROR"
_PID = "PID"


class ReadinessReporter:
    """The daemon's end of the readiness pipe.

    ``ready()`` and ``failed()`` report once and close the pipe; ``close()`` drops
    it without a word, as each forked worker must, so that only the master keeps
    the launcher waiting (otherwise a dead master is noticed only once its
    workers are gone too).
    """

    def __init__(self, write_fd: int) -> None:
        self._fd: int | None = write_fd

    def fileno(self) -> int | None:
        return self._fd

    def ready(self) -> None:
        self._report(_READY)

    def failed(self, exit_code: int, message: str) -> None:
        """The launcher prints ``message`` (one line) and exits with ``exit_code``."""
        self._report(f"{_ERROR} {exit_code} {' '.join(message.splitlines())}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _announce_pid(self) -> None:
        self._write(f"{_PID} {os.getpid()}")

    def _report(self, record: str) -> None:
        if self._fd is None:
            return  # already reported (or closed in a worker)
        self._write(record)
        self.close()

    def _write(self, record: str) -> None:
        if self._fd is None:
            return
        data = (record.encode(errors="replace")[: _MAX_RECORD_BYTES - 1]) + b"\n"
        try:
            os.write(self._fd, data)
        except OSError:
            pass  # the launcher is gone (killed, Ctrl-C): nobody is waiting; carry on


def launch_daemon(
    *,
    files_preserve: Sequence[int],
    umask: int,
    working_directory: str = "/",
    ready_timeout: float = DEFAULT_READY_TIMEOUT_SECONDS,
    stderr: IO[str] | None = None,
) -> ReadinessReporter:
    """Detach; returns only in the daemon, the launcher exits with the daemon's verdict.

    The launcher exits 0 on ``ready()``; on ``failed()`` it prints the message to
    stderr and exits with the code; if the daemon dies without a word or stays
    silent past ``ready_timeout`` (then it is sent SIGTERM) it says why and exits
    1. ``stderr`` (an open file, e.g. the log file) becomes the daemon's fd 2
    instead of /dev/null, so that a crash leaves a trace.
    """
    read_fd, write_fd = os.pipe()
    # The launcher leaves through os._exit(), which flushes nothing; and the daemon's
    # copy of the buffers would be flushed into /dev/null. Write pending output now.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        _wait_for_daemon(read_fd, intermediate_pid=pid, timeout=ready_timeout)
    os.close(read_fd)
    reporter = ReadinessReporter(write_fd)
    try:
        _enter_daemon_context(
            files_preserve=[*files_preserve, write_fd],
            umask=umask,
            working_directory=working_directory,
            stderr=stderr,
        )
    except BaseException as exc:
        # A child of the launcher (before or after python-daemon's forks): say why to
        # the launcher, and never return into the caller's code.
        reporter.failed(exitcodes.FAILURE, f"echod: cannot daemonize: {exc}")
        os._exit(exitcodes.FAILURE)
    reporter._announce_pid()
    return reporter


def _enter_daemon_context(
    *, files_preserve: list[int], umask: int, working_directory: str, stderr: IO[str] | None
) -> None:
    # Imported here, where echod daemonizes, and not at start-up: the foreground
    # path (systemd, containers) never needs it, and python-daemon before 3.0.1
    # builds a set of every possible descriptor at import (87 MB at a limit of
    # 1,048,576). The master is not yet serving: no in-place upgrade can have
    # replaced files under it.
    import daemon

    with open(os.devnull, "r+") as devnull:
        context = daemon.DaemonContext(
            detach_process=True,
            files_preserve=files_preserve,
            umask=umask,
            working_directory=working_directory,
            stdin=devnull,
            stdout=devnull,
            stderr=stderr if stderr is not None else devnull,
            signal_map={},
            prevent_core=False,
        )
        context.open()
    # fds 0-2 now are dups of /dev/null (or the log); the original is closed here.


def _wait_for_daemon(read_fd: int, *, intermediate_pid: int, timeout: float) -> NoReturn:
    """The launcher: wait for the daemon's verdict, print it, exit with it."""
    daemon_pid: int | None = None
    code, message = exitcodes.FAILURE, ""
    buffered = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                message = _give_up(daemon_pid, timeout)
                break
            if not poller.poll(remaining * 1000):
                continue  # the deadline check above decides
            chunk = os.read(read_fd, 4096)
            if not chunk:
                who = f"the daemon (pid {daemon_pid})" if daemon_pid else "the daemon"
                message = f"echod: {who} exited before it was ready; see its log"
                break
            buffered += chunk
            *records, buffered = buffered.split(b"\n")
            verdict = None
            for record in records:
                kind, _, rest = record.decode(errors="replace").partition(" ")
                if kind == _PID and rest.isdigit():
                    daemon_pid = int(rest)
                elif kind == _READY:
                    verdict = (exitcodes.OK, "")
                elif kind == _ERROR:
                    raw_code, _, text = rest.partition(" ")
                    reported = int(raw_code) if raw_code.isdigit() else exitcodes.FAILURE
                    verdict = (reported if 0 < reported < 256 else exitcodes.FAILURE, text)
            if verdict is not None:
                code, message = verdict
                break
    except KeyboardInterrupt:
        who = f"(pid {daemon_pid}) " if daemon_pid else ""
        code = 128 + signal.SIGINT
        message = f"echod: interrupted; the daemon {who}goes on starting in the background"
    with contextlib.suppress(ChildProcessError):
        os.waitpid(intermediate_pid, os.WNOHANG)  # it exits at once (python-daemon's fork)
    if message:
        print(message, file=sys.stderr, flush=True)
    os._exit(code)


def _give_up(daemon_pid: int | None, timeout: float) -> str:
    if daemon_pid is None:
        return f"echod: the daemon did not start within {timeout:g} s"
    try:
        os.kill(daemon_pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"echod: the daemon (pid {daemon_pid}) died before it was ready"
    return (
        f"echod: the daemon (pid {daemon_pid}) did not report ready within {timeout:g} s;"
        " sent it SIGTERM"
    )
