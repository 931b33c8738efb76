"""Process and socket plumbing for the harness: start servers in their own
process group and always take them down again; loopback-only probes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"  # everything stays on loopback
PR_SET_CHILD_SUBREAPER = 36


# ------------------------------------------------------------------ limits, reaping
def raise_nofile(needed: int) -> int:
    """Raise RLIMIT_NOFILE to at least `needed` (children inherit it); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        needed = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


def become_subreaper() -> None:
    """Orphans of our children (servers left by a killed compare.py) re-parent to us,
    so reap_orphans() can still find and kill them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _ppids() -> dict[int, int]:
    parents = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        parents[int(d)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    return parents


def proc_tree(root: int) -> set[int]:
    """root and all its live descendants."""
    parents = _ppids()
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = {pid for pid, pp in parents.items() if pp == p} - tree
        tree |= kids
        frontier += kids
    return tree if root in parents else set()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_tree_groups(root: int) -> None:
    """SIGKILL the process group of root and of every descendant (servers run in their own)."""
    groups = set()
    for pid in proc_tree(root):
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    groups.discard(os.getpgrp())  # never our own group
    for g in groups:
        _killpg(g, signal.SIGKILL)


def reap_orphans() -> int:
    """Kill and reap whatever re-parented to us; returns how many were found."""
    me, found = os.getpid(), 0
    for pid, pp in _ppids().items():
        if pp != me:
            continue
        found += 1
        kill_tree_groups(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(found):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, 0)
    return found


# ------------------------------------------------------------------ supervised commands
def stop_process(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal proc, wait up to `grace`, then SIGKILL its group and its descendants' groups."""
    if proc.poll() is None:
        victims = proc_tree(proc.pid)  # before it dies: its orphans lose their parent link
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        for pid in victims:
            with contextlib.suppress(OSError):
                if (pgid := os.getpgid(pid)) != os.getpgrp():
                    _killpg(pgid, signal.SIGKILL)
    if proc.pid != os.getpgrp():
        _killpg(proc.pid, signal.SIGKILL)  # stray members of its own group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _default_sigint() -> None:
    # a background job inherits SIGINT ignored; the child must still clean up on it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_supervised(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, stdout_path: Path
) -> int:
    """Run cmd in its own session; on timeout, error or Ctrl-C stop it and its children.
    SIGINT first: compare.py then stops its current server itself."""
    with stdout_path.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc, signal.SIGINT, grace=15)
        raise TimeoutError(f"{shlex.join(cmd[:2])}: no exit within {timeout:.0f} s") from None
    finally:
        if proc.poll() is None:
            stop_process(proc, signal.SIGINT, grace=15)


@contextlib.contextmanager
def server(command: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A server command (already formatted), run like compare.py runs it, stopped on exit."""
    with log.open("a") as out:
        out.write(f"### {time.strftime('%H:%M:%S')} exec {command}\n")
        out.flush()
        proc = subprocess.Popen(
            ["/bin/sh", "-c", "exec " + command],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


# ------------------------------------------------------------------ sockets
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def echo_byte(sock: socket.socket) -> bool:
    """One 1-byte round trip on an open connection."""
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b"x"
    except OSError:
        return False


def echo_once(port: int, timeout: float) -> bool:
    """Connect, 1-byte echo, close."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            return echo_byte(s)
    except OSError:
        return False


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, interval: float = 0.005) -> float:
    """Poll until the server echoes; return seconds waited.  Raise if it exits or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if echo_once(port, timeout=0.5):
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before echoing")
        time.sleep(interval)
    raise TimeoutError(f"server did not echo on port {port} within {timeout:.0f} s")


def open_idle(port: int, count: int, deadline: float) -> list[socket.socket]:
    """`count` connections, each proven served by a 1-byte echo; all closed on failure."""
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"opened only {i}/{count} idle connections in time")
            s = socket.create_connection((HOST, port), timeout=5)
            socks.append(s)
            if not echo_byte(s):
                raise RuntimeError(f"idle connection {i} got no 1-byte echo")
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def rss_bytes(pid: int) -> int:
    """VmRSS from /proc; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_snapshot(root: int) -> dict[int, int]:
    return {pid: rss_bytes(pid) for pid in proc_tree(root)}


def settled_snapshot(root: int, limit_s: float = 3.0) -> dict[int, int]:
    """RSS of the tree once two readings 100 ms apart agree (or after limit_s)."""
    prev = rss_snapshot(root)
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        time.sleep(0.1)
        cur = rss_snapshot(root)
        if cur == prev:
            return cur
        prev = cur
    return prev


# ------------------------------------------------------------------ machine load
def _busy_seconds() -> float:
    """CPU time the whole machine spent not idle (steal included: it is lost to us too)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """Our CPU plus that of every descendant already reaped (servers, echoload, compare.py)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """Share of the machine's CPU capacity used by processes that are not ours during a
    part of the run: other work on a small machine is the biggest source of noise."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), _busy_seconds(), _own_seconds()

    def share(self) -> float:
        wall = time.monotonic() - self.t0
        foreign = (_busy_seconds() - self.busy0) - (_own_seconds() - self.own0)
        return max(0.0, foreign / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0
