"""Background client load for lifecycle tests: connection churn plus held conversations.

Every failure is recorded with its reason; loops are bounded in time and count.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    attempted: int = 0
    failed: int = 0
    held_roundtrips: int = 0
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"connections attempted={self.attempted} failed={self.failed} "
            f"held round trips={self.held_roundtrips} errors={self.errors[:5]}"
        )


class ClientLoad:
    """`churners` threads connect/echo/close in a loop; `held` connections stay open
    and echo throughout. Use as a context manager; read `.report` afterwards."""

    def __init__(
        self, host: str, port: int, churners: int = 2, held: int = 4, max_seconds: float = 60.0
    ) -> None:
        self.address = (host, port)
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._held = [socket.create_connection(self.address, timeout=10) for _ in range(held)]
        self._threads = [threading.Thread(target=self._churn, daemon=True) for _ in range(churners)]
        if held:
            self._threads.append(threading.Thread(target=self._converse, daemon=True))

    def __enter__(self) -> ClientLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_progress(self, attempts: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.report.attempted < attempts and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> LoadReport:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        for sock in self._held:
            sock.close()
        return self.report

    def _record(self, ok: bool, error: str = "") -> None:
        with self._lock:
            self.report.attempted += 1
            if not ok:
                self.report.failed += 1
                self.report.errors.append(error)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _churn(self) -> None:
        while self._running():
            payload = os.urandom(64)
            try:
                with socket.create_connection(self.address, timeout=10) as sock:
                    sock.sendall(payload)
                    received = b""
                    while len(received) < len(payload):
                        chunk = sock.recv(len(payload) - len(received))
                        if not chunk:
                            break
                        received += chunk
                ok = received == payload
                self._record(ok, "" if ok else f"short or wrong echo ({len(received)} bytes)")
            except OSError as exc:
                self._record(False, f"{type(exc).__name__}: {exc}")

    def _converse(self) -> None:
        count = 0
        while self._running():
            for sock in self._held:
                message = f"held {count}".encode()
                count += 1
                try:
                    sock.sendall(message)
                    received = b""
                    while len(received) < len(message):
                        chunk = sock.recv(len(message) - len(received))
                        if not chunk:
                            raise ConnectionError("held connection closed")
                        received += chunk
                    if received != message:
                        raise ConnectionError("held connection echoed wrong bytes")
                except OSError as exc:
                    with self._lock:
                        self.report.errors.append(f"held: {exc}")
                        self.report.failed += 1
                    return
                with self._lock:
                    self.report.held_roundtrips += 1
            time.sleep(0.05)
