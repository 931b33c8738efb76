#!/usr/bin/env python3
"""How evenly echod's workers share connections, for each arrival pattern.

Starts ``echod -F -w W`` on a free loopback port and, for each pattern, reports
the open connections per worker (counted by the kernel) and max/fair share
(1.00 = perfectly even; the goal is <= 1.10 x fair + 1, the SPEC's bound in the
tests is 1.25 x fair + 2):

  sequential   N connections one after another, each echoing a byte and staying open
  burst        N more opened all at once, on top
  mixed        a fresh server: N long-lived connections opened while short ones
               (connect, echo, close) churn alongside them
  replacement  after sequential: one worker SIGKILLed, N more once it was replaced
  ttin         W-1 workers with N connections, TTIN, then N/W more

    .venv/bin/python benchmarks/balance.py [--workers 4] [-n 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, echod: str, workers: int) -> None:
        self.port = free_port()
        self.run = tempfile.mkdtemp(prefix="echod-balance-")
        os.chmod(self.run, 0o700)
        self.proc = subprocess.Popen(
            [
                echod,
                "-F",
                "-w",
                str(workers),
                "-b",
                f"127.0.0.1:{self.port}",
                "--runtime-dir",
                self.run,
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.master = psutil.Process(self.proc.pid)
        self.socks: list[socket.socket] = []
        self.wait_workers(workers)

    def workers(self) -> list[psutil.Process]:
        alive = []
        for child in self.master.children():
            try:
                if "metrics" not in " ".join(child.cmdline()):
                    alive.append(child)
            except psutil.Error:  # a zombie not reaped yet, or gone
                continue
        return alive

    def wait_workers(self, count: int, timeout: float = 15) -> None:
        until(lambda: len(self.workers()) == count and self.answers(), timeout)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"?")
                return s.recv(1) == b"?"
        except OSError:
            return False

    def held(self) -> dict[int, int]:
        counts = {}
        for child in self.workers():
            try:
                conns = child.net_connections("tcp4")
            except psutil.Error:
                continue
            counts[child.pid] = sum(
                1
                for c in conns
                if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port
            )
        return counts

    def settled(self, total: int, workers: int) -> list[int]:
        until(lambda: len(h := self.held()) == workers and sum(h.values()) == total, 10)
        return sorted(self.held().values(), reverse=True)

    def open(self, count: int, at_once: bool = False) -> None:
        if at_once:
            burst = [
                socket.create_connection(("127.0.0.1", self.port), timeout=5) for _ in range(count)
            ]
            for s in burst:
                s.sendall(b"y")
            for s in burst:
                s.recv(1)
            self.socks += burst
            return
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(b"x")
            s.recv(1)
            self.socks.append(s)
            time.sleep(0.002)

    def stop(self) -> None:
        for s in self.socks:
            s.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def until(predicate: Callable[[], object], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise SystemExit("balance: timed out waiting for echod")
        time.sleep(0.05)


def churn(port: int, stop: threading.Event) -> int:
    done = 0
    while not stop.is_set() and done < 100_000:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"s")
            s.recv(1)
        done += 1
    return done


def ratio(counts: list[int]) -> float:
    total = sum(counts)
    return round(max(counts) * len(counts) / total, 2) if total else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--echod", default=os.path.join(os.path.dirname(sys.executable), "echod"))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("-n", type=int, default=200, help="connections per pattern")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    w, n = a.workers, a.n
    results: dict[str, list[int]] = {}

    server = Server(a.echod, w)
    try:
        server.open(n)
        results["sequential"] = server.settled(n, w)
        server.open(n, at_once=True)
        results["burst"] = server.settled(2 * n, w)
    finally:
        server.stop()

    server = Server(a.echod, w)
    try:
        stop = threading.Event()
        churner = threading.Thread(target=churn, args=(server.port, stop))
        churner.start()
        try:
            server.open(n)
        finally:
            stop.set()
            churner.join()
        results["mixed"] = server.settled(n, w)
    finally:
        server.stop()

    server = Server(a.echod, w)
    try:
        server.open(n)
        server.settled(n, w)
        victim = server.workers()[0]
        lost = server.held()[victim.pid]
        victim.kill()
        until(lambda: victim.pid not in {p.pid for p in server.workers()}, 10)
        server.wait_workers(w)
        server.settled(n - lost, w)
        server.open(n)
        results["replacement"] = server.settled(2 * n - lost, w)
    finally:
        server.stop()

    server = Server(a.echod, w - 1)
    try:
        server.open(n)
        server.settled(n, w - 1)
        server.proc.send_signal(signal.SIGTTIN)
        server.wait_workers(w)
        server.open(n // w)
        results["ttin"] = server.settled(n + n // w, w)
    finally:
        server.stop()

    report = {
        name: {
            "per_worker": counts,
            "max_over_fair": ratio(counts),
            "target": round((1.10 * sum(counts) / len(counts) + 1) * len(counts) / sum(counts), 2),
        }
        for name, counts in results.items()
    }
    if a.json:
        print(json.dumps({"workers": w, "n": n, "patterns": report}, indent=2))
    else:
        print(f"{w} workers, {n} connections per pattern")
        print(f"{'pattern':<12} {'max/fair':>8} {'target':>7}  per worker")
        for name, row in report.items():
            print(
                f"{name:<12} {row['max_over_fair']:>8.2f} {row['target']:>7.2f}  "
                f"{row['per_worker']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
