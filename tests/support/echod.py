"""The real ``echod`` as a subprocess, and the socket helpers its tests share.

Every EchodProcess is in its own session and is killed by process group,
whatever the test did to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

LISTENING = re.compile(r"listening on (\S+)")
READY = re.compile(r"ready: (\d+) worker")


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll until predicate() is truthy; fail the test with `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def recv_exactly(sock: socket.socket, size: int, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise AssertionError(f"connection closed after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


def recv_until_eof(sock: socket.socket, timeout: float = 10.0, limit: int = 64 << 20) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while len(data) <= limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError("peer sent more than expected")


def assert_closed_by_server(sock: socket.socket, timeout: float = 5.0) -> None:
    """The server closed ``sock``: an orderly EOF, or a reset (it had unread data)."""
    sock.settimeout(timeout)
    try:
        assert sock.recv(1) == b"", "the connection is still open"
    except ConnectionResetError:
        pass


def connection_refused(host: str, port: int) -> bool:
    """A new connection to host:port is refused (the listener is gone).

    A reset counts as "not yet": a connection the kernel queued in the instant
    the last copy of a listener closed is reset, not refused; the next try is
    refused.
    """
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


def echo_roundtrip(sock: socket.socket, payload: bytes, timeout: float = 10.0) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload), timeout)


class EchodProcess:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        runtime_dir: Path,
        nofile: int | tuple[int, int] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.argv = argv
        self.runtime_dir = runtime_dir
        self.lines: list[str] = []
        self._cond = threading.Condition()

        def limit_descriptors() -> None:
            """``nofile``: N (soft = hard = N) or (soft, hard). ``preexec``: e.g. enter a cgroup."""
            if nofile:
                limits = nofile if isinstance(nofile, tuple) else (nofile, nofile)
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            if preexec is not None:
                preexec()

        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=limit_descriptors,
            cwd=runtime_dir.parent,
        )  # not the repo: its egg-info
        # would shadow the installed distribution's metadata
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 15.0, start: int = 0
    ) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no log line matching {regex.pattern!r}; "
                        f"output so far:\n{self.output_unlocked()}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def output_unlocked(self) -> str:
        return "\n".join(self.lines)

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_ready(self, timeout: float = 15.0) -> None:
        self.wait_for_log(READY, timeout)

    @property
    def addresses(self) -> list[str]:
        with self._cond:
            return [m.group(1) for line in self.lines if (m := LISTENING.search(line))]

    @property
    def port(self) -> int:
        for address in self.addresses:
            if not address.startswith(("unix:", "udp://")):
                return int(address.rsplit(":", 1)[1])
        raise AssertionError("no TCP listener logged")

    @property
    def host(self) -> str:
        for address in self.addresses:
            if not address.startswith(("unix:", "udp://")):
                return address.rsplit(":", 1)[0].strip("[]")
        raise AssertionError("no TCP listener logged")

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def worker_pids(self) -> list[int]:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(c.pid for c in children if _is_worker(c))

    def wait_workers(
        self, count: int, timeout: float = 15.0, exclude: set[int] | None = None
    ) -> list[int]:
        exclude = exclude or set()

        def settled() -> list[int] | None:
            pids = [p for p in self.worker_pids() if p not in exclude]
            return pids if len(pids) == count and len(self.worker_pids()) == count else None

        return wait_until(settled, timeout, message=f"{count} workers of {self.argv}")

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def _is_worker(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        if "echod: metrics" in " ".join(proc.cmdline()):
            return False  # the metrics endpoint's process is a child too, not a worker
        return proc.status() != psutil.STATUS_ZOMBIE
    return False


def echod_command() -> list[str]:
    return [sys.executable, "-m", "echod"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ECHOD_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def to_toml(values: dict[str, Any]) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, list):
            items = ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value)
            lines.append(f"{key} = [{items}]")
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


ECHOCTL = (sys.executable, "-m", "echod.ctl.main")


def run_echoctl(
    *args: str | int, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run echoctl to completion (killed and reaped if it overruns) and check it stayed tidy."""
    completed = subprocess.run(
        [*ECHOCTL, *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    result = subprocess.CompletedProcess(
        completed.args,
        completed.returncode,
        completed.stdout.decode("utf-8", "replace"),
        completed.stderr.decode("utf-8", "replace"),
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def status_json(runtime_dir: str | Path) -> dict[str, Any]:
    """``echoctl status --json`` for the echod whose runtime dir this is (it must succeed)."""
    result = run_echoctl("status", "--json", "--runtime-dir", runtime_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
