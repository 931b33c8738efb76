#!/usr/bin/env python3
"""A chaos soak of echod: load plus random lifecycle events, with every invariant checked.

Starts ``echod -F -w 4`` on a free loopback port and, for ``--duration`` seconds,
runs ``--conversations`` long-lived conversations (each lives 5-15 s, then closes
cleanly and a new one opens; every echo is checked byte for byte) and
``--short-threads`` threads of short connections (connect, echo 64 random bytes,
close), while every 1-2 s one of: SIGKILL a worker, HUP, TTIN, TTOU, USR1 with the
log file moved away; and USR2 every 10 s.

Invariants: no byte mismatch; no refused connection; every lost conversation or
short connection was on a worker this soak SIGKILLed (or, when its owner was not
seen yet, one was killed during its life); the master's pid never changes; every
USR1 re-creates the moved log; at the end the workers are back to the desired
count, and the master's fd count and RSS are what they were at the start (same
worker count). Prints one JSON summary; exits 1 if an invariant failed.

    .venv/bin/python benchmarks/soak.py [--duration 120] [--conversations 30] [--json-only]
    make soak SOAK_ARGS='--duration 20'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MIN_WORKERS, MAX_WORKERS = 2, 6
USERS = re.compile(r"pid=(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed by the server after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


@dataclass
class Conversation:
    port: int
    opened: float
    owner: int | None = None


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    conversation_round_trips: int = 0
    conversations_opened: int = 0
    conversations_completed: int = 0
    short_ok: int = 0
    refused: int = 0
    mismatches: list[str] = field(default_factory=list)
    lost_ok: Counter[str] = field(default_factory=Counter)
    lost_unexplained: list[str] = field(default_factory=list)
    connect_errors: list[str] = field(default_factory=list)

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + amount)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="echod-soak-"))
        self.port = free_port()
        self.address = ("127.0.0.1", self.port)
        self.log_file = self.workdir / "echod.log"
        self.stats = Stats()
        self.running = threading.Event()
        self.kills: list[tuple[float, int]] = []  # (when, pid) of every SIGKILL we sent
        self.killed: set[int] = set()
        self.actions: Counter[str] = Counter()
        self.action_problems: list[str] = []
        self.live: dict[int, Conversation] = {}  # client port -> conversation
        self.live_lock = threading.Lock()
        self.desired = args.workers
        self.proc: subprocess.Popen[bytes] | None = None

    # -- echod -------------------------------------------------------------------
    def start(self) -> None:
        (self.workdir / "run").mkdir()
        argv = [
            sys.executable,
            "-m",
            "echod",
            "-F",
            "-w",
            str(self.args.workers),
            "-b",
            f"127.0.0.1:{self.port}",
            "--runtime-dir",
            str(self.workdir / "run"),
            "--log-file",
            str(self.log_file),
        ]
        output = open(self.workdir / "echod.out", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
        )
        output.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"echod exited with {self.proc.returncode}; see {self.workdir}")
            if len(self.workers()) == self.args.workers and self._answers():
                return
            time.sleep(0.1)
        raise SystemExit(f"echod did not serve within 30 s; see {self.workdir}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(self.address, timeout=2) as sock:
                sock.sendall(b"up?")
                return recv_exactly(sock, 3) == b"up?"
        except OSError:
            return False

    def master(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def workers(self) -> list[int]:
        with contextlib.suppress(psutil.Error):
            return sorted(
                c.pid for c in self.master().children() if c.status() != psutil.STATUS_ZOMBIE
            )
        return []

    def master_sample(self) -> dict[str, float]:
        master = self.master()
        return {"fds": master.num_fds(), "rss_mb": round(master.memory_info().rss / 2**20, 2)}

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(40)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        return code

    # -- load --------------------------------------------------------------------
    def _killed_during(self, start: float, end: float) -> bool:
        return any(start - 0.5 <= when <= end + 0.5 for when, _ in list(self.kills))

    def _lost(self, what: str, owner: int | None, start: float, why: str) -> None:
        now = time.monotonic()
        if owner is not None and owner in self.killed:
            verdict = "owner_killed"
        elif owner is None and self._killed_during(start, now):
            verdict = "killed_during_life"
        else:
            with self.stats.lock:
                self.stats.lost_unexplained.append(
                    f"{what} (owner {owner}) lost after {now - start:.1f}s: {why}"
                )
            return
        with self.stats.lock:
            self.stats.lost_ok[f"{what}_{verdict}"] += 1

    def converse(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running.is_set():
            try:
                sock = socket.create_connection(self.address, timeout=10)
            except ConnectionRefusedError:
                self.stats.add("refused")
                time.sleep(0.1)
                continue
            except OSError as exc:
                with self.stats.lock:
                    self.stats.connect_errors.append(f"conversation connect: {exc}")
                time.sleep(0.1)
                continue
            conv = Conversation(sock.getsockname()[1], time.monotonic())
            with self.live_lock:
                self.live[conv.port] = conv
            self.stats.add("conversations_opened")
            end = conv.opened + rng.uniform(5, 15)
            try:
                while self.running.is_set() and time.monotonic() < end:
                    payload = rng.randbytes(rng.randint(1, 4096))
                    try:
                        sock.sendall(payload)
                        echoed = recv_exactly(sock, len(payload))
                    except OSError as exc:
                        self._lost("conversation", conv.owner, conv.opened, repr(exc))
                        break
                    if echoed != payload:
                        with self.stats.lock:
                            self.stats.mismatches.append(f"conversation {conv.port}")
                        break
                    self.stats.add("conversation_round_trips")
                    time.sleep(rng.uniform(0.02, 0.1))
                else:
                    self.stats.add("conversations_completed")
            finally:
                sock.close()
                with self.live_lock:
                    self.live.pop(conv.port, None)

    def short_connections(self) -> None:
        while self.running.is_set():
            started = time.monotonic()
            payload = os.urandom(64)
            try:
                with socket.create_connection(self.address, timeout=10) as sock:
                    sock.sendall(payload)
                    echoed = recv_exactly(sock, len(payload))
            except ConnectionRefusedError:
                self.stats.add("refused")
                continue
            except OSError as exc:
                self._lost("short", None, started, repr(exc))
                continue
            if echoed != payload:
                with self.stats.lock:
                    self.stats.mismatches.append("short connection")
            else:
                self.stats.add("short_ok")

    def watch_owners(self) -> None:
        """Which worker holds each conversation: ss, filtered in the kernel (no TIME_WAIT)."""
        query = ["ss", "-Htnp", "state", "established", f"( sport = :{self.port} )"]
        while self.running.is_set():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                lines = subprocess.run(
                    query, capture_output=True, text=True, timeout=5
                ).stdout.splitlines()
                for line in lines:
                    parts = line.split()
                    match = USERS.search(line)
                    if len(parts) < 4 or not match:
                        continue
                    peer_port = int(parts[3].rsplit(":", 1)[1])
                    with self.live_lock:
                        conv = self.live.get(peer_port)
                        if conv is not None and conv.owner is None:
                            conv.owner = int(match.group(1))
            time.sleep(0.2)

    # -- chaos -------------------------------------------------------------------
    def act(self, kind: str) -> None:
        assert self.proc is not None
        if kind == "kill":
            workers = self.workers()
            if not workers:
                return
            victim = self.rng.choice(workers)
            self.kills.append((time.monotonic(), victim))
            self.killed.add(victim)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        elif kind == "ttin":
            self.desired += 1
            os.kill(self.proc.pid, signal.SIGTTIN)
        elif kind == "ttou":
            self.desired -= 1
            os.kill(self.proc.pid, signal.SIGTTOU)
        elif kind == "usr1":
            moved = self.workdir / f"echod.log.{self.actions['usr1'] + 1}"
            with contextlib.suppress(FileNotFoundError):
                self.log_file.rename(moved)
            os.kill(self.proc.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not self.log_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.log_file.exists():
                self.action_problems.append("USR1 did not re-create the moved log within 5 s")
        elif kind == "hup":
            # a reload goes back to the configured worker count (as gunicorn's does)
            self.desired = self.args.workers
            os.kill(self.proc.pid, signal.SIGHUP)
        else:
            # the upgraded master keeps the count it had (TTIN/TTOU survive an upgrade)
            done = self.upgrades_logged()
            os.kill(self.proc.pid, signal.SIGUSR2)
            # wait for it: a TTIN or HUP pending with it would be handled in signal
            # order, not ours, and the desired count would be a guess
            deadline = time.monotonic() + 30
            while self.upgrades_logged() <= done and time.monotonic() < deadline:
                time.sleep(0.1)
        self.actions[kind] += 1

    def upgrades_logged(self) -> int:
        count = 0
        for path in self.workdir.glob("echod.log*"):
            with contextlib.suppress(OSError):
                count += path.read_text(errors="replace").count("upgraded in place")
        return count

    def chaos(self, until: float) -> None:
        next_usr2 = time.monotonic() + 10
        while time.monotonic() < until:
            time.sleep(self.rng.uniform(1, 2))
            if self.proc is None or self.proc.poll() is not None:
                self.action_problems.append("the master exited during the soak")
                return
            if time.monotonic() >= next_usr2:
                self.act("usr2")
                next_usr2 += 10
                continue
            kind = self.rng.choices(["kill", "hup", "ttin", "ttou", "usr1"], [3, 2, 1, 1, 1])[0]
            if kind == "ttin" and self.desired >= MAX_WORKERS:
                kind = "ttou"
            elif kind == "ttou" and self.desired <= MIN_WORKERS:
                kind = "ttin"
            self.act(kind)

    def settle(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.workers()) == count:
                return True
            time.sleep(0.2)
        return False

    # -- the run -------------------------------------------------------------------
    def run(self) -> dict[str, object]:
        self.start()
        assert self.proc is not None
        pid = self.proc.pid
        time.sleep(1)
        before = self.master_sample()
        self.running.set()
        threads = [
            threading.Thread(target=self.converse, args=(self.args.seed * 1000 + i,), daemon=True)
            for i in range(self.args.conversations)
        ]
        threads += [
            threading.Thread(target=self.short_connections, daemon=True)
            for _ in range(self.args.short_threads)
        ]
        threads.append(threading.Thread(target=self.watch_owners, daemon=True))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        self.chaos(started + self.args.duration)
        self.running.clear()
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
        master_alive = self.proc.poll() is None
        back_to_desired = master_alive and self.settle(self.desired, 60)
        final_desired, final_workers = self.desired, len(self.workers())
        upgrades = self.upgrades_logged()
        # compare the master with itself at the same worker count as at the start
        while master_alive and self.desired != self.args.workers:
            self.act("ttin" if self.desired < self.args.workers else "ttou")
            self.settle(self.desired, 15)
        after = self.master_sample() if master_alive else {"fds": -1, "rss_mb": -1.0}
        pidfile = self.workdir / "run" / "echod.pid"
        pid_in_file = pidfile.read_text().strip() if pidfile.exists() else ""
        stats = self.stats
        invariants = {
            "no_byte_mismatch": (not stats.mismatches, stats.mismatches[:5]),
            "no_refused_connection": (stats.refused == 0, stats.refused),
            "every_loss_on_a_killed_worker": (
                not stats.lost_unexplained,
                stats.lost_unexplained[:5],
            ),
            "no_other_connect_error": (not stats.connect_errors, stats.connect_errors[:5]),
            "master_pid_unchanged": (
                master_alive and pid_in_file == str(pid),
                {"pid": pid, "alive": master_alive, "pidfile": pid_in_file},
            ),
            "usr1_recreated_the_log_each_time": (not self.action_problems, self.action_problems),
            "every_usr2_upgraded_in_place": (
                upgrades == self.actions["usr2"],
                {"usr2_sent": self.actions["usr2"], "upgrades_logged": upgrades},
            ),
            "workers_back_to_desired": (
                back_to_desired,
                {"desired": final_desired, "running": final_workers},
            ),
            "master_fds_stable": (0 <= after["fds"] <= before["fds"] + 2, [before, after]),
            "master_rss_stable": (
                0 <= after["rss_mb"] <= before["rss_mb"] + self.args.rss_slack_mb,
                [before, after],
            ),
        }
        exit_code = self.stop()
        invariants["clean_stop"] = (exit_code == 0, exit_code)
        ok = all(result for result, _ in invariants.values())
        summary: dict[str, object] = {
            "command": " ".join(sys.argv),
            "duration_s": round(elapsed, 1),
            "workers": {
                "start": self.args.workers,
                "desired_at_end": final_desired,
                "running_at_end": final_workers,
            },
            "round_trips": {
                "conversations": stats.conversation_round_trips,
                "short_connections": stats.short_ok,
                "total": stats.conversation_round_trips + stats.short_ok,
            },
            "connections": {
                "conversations_opened": stats.conversations_opened,
                "conversations_completed": stats.conversations_completed,
                "short": stats.short_ok,
                "short_per_s": round(stats.short_ok / elapsed),
                "lost_on_killed_workers": dict(stats.lost_ok),
            },
            "actions": dict(sorted(self.actions.items())),
            "master": {"pid": pid, "before": before, "after": after},
            "invariants": {
                name: {"ok": bool(result), "detail": detail}
                for name, (result, detail) in invariants.items()
            },
            "pass": ok,
        }
        if ok and not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            summary["workdir"] = str(self.workdir)
        return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--short-threads", type=int, default=6)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--rss-slack-mb", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()
    # `timeout`, a closed terminal or kill: unwind, so that echod is stopped too
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: sys.exit(128 + signum))
    soak = Soak(args)
    try:
        summary = soak.run()
    finally:
        soak.stop()
    summary["seed"] = args.seed
    print(json.dumps(summary, indent=2))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
