#!/usr/bin/env python3
"""What the PROXY protocol costs echod, in server CPU per connection.

echoload cannot send a PROXY header, so this plays the balancer itself: client
threads loop connect -> (PROXY v2 header +) 64 bytes in one write, as HAProxy's
send-proxy-v2 does -> read the echo -> close, against one echod worker, and the
figure is echod's CPU time (master and workers, from /proc) over the connections
completed. The client's own speed does not enter it. Three cases, interleaved in
each repeat so that drifting machine load hits them alike:

  off        proxy_protocol_from = []: the plain worker class, the list's absence
  untrusted  a list that does not hold the client (10.0.0.0/8): what every other
             source pays once a list is set
  trusted    127.0.0.0/8 listed, every connection begins with a v2 header

Loopback only. Usage: benchmarks/proxy_cost.py [--connections 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench_procs import HOST, free_port, proc_tree, server

PAYLOAD = bytes(range(64))
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
CASES = {
    "off": ("[]", False),
    "untrusted": ('["10.0.0.0/8"]', False),
    "trusted": ('["127.0.0.0/8"]', True),
}


def v2_header(client_port: int) -> bytes:
    """PROXY v2, PROXY command, TCP over IPv4: a made-up client 192.0.2.1 (TEST-NET, never
    contacted: it is only the address the header claims)."""
    body = socket.inet_aton("192.0.2.1") + socket.inet_aton(HOST)
    body += struct.pack("!HH", client_port, 7)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


@dataclass
class Result:
    connections: int
    failures: int
    server_cpu_s: float

    @property
    def us_per_connection(self) -> float:
        return 1e6 * self.server_cpu_s / max(1, self.connections)


def cpu_seconds(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / 100  # USER_HZ is 100 on Linux


def drive(port: int, connections: int, threads: int, with_header: bool) -> tuple[int, int]:
    """Run the connection loop on `threads` threads; return (completed, failed)."""
    done, failed = [0] * threads, [0] * threads
    deadline = time.monotonic() + 300  # bounded even if the server stalls

    def loop(index: int) -> None:
        for n in range(connections // threads):
            if time.monotonic() > deadline:
                return
            message = (v2_header(1024 + n % 60000) if with_header else b"") + PAYLOAD
            try:
                with socket.create_connection((HOST, port), timeout=5) as sock:
                    sock.sendall(message)
                    echoed = b""
                    while len(echoed) < len(PAYLOAD):
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        echoed += chunk
                if echoed == PAYLOAD:
                    done[index] += 1
                else:
                    failed[index] += 1
            except OSError:
                failed[index] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return sum(done), sum(failed)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, with_header: bool) -> None:
    """Poll until one connection is echoed (with its header where the source is trusted:
    a bare byte would only wait out proxy_header_timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"echod exited with {proc.returncode} before echoing")
        if drive(port, 1, 1, with_header) == (1, 0):
            return
        time.sleep(0.05)
    raise TimeoutError(f"echod did not echo on port {port} within {timeout:.0f} s")


def measure(case: str, args: argparse.Namespace, scratch: Path) -> Result:
    proxy_list, with_header = CASES[case]
    config = scratch / f"{case}.toml"
    config.write_text(f"workers = 1\nproxy_protocol_from = {proxy_list}\n")
    port = free_port()
    command = (
        f"{sys.executable} -m echod -F -c {config} --runtime-dir {scratch / case}"
        f" -b {HOST}:{port} --log-level warning"
    )
    with server(command, Path.cwd(), {"PATH": "/usr/bin:/bin"}, scratch / "server.log") as proc:
        wait_ready(proc, port, timeout=15, with_header=with_header)
        pids = proc_tree(proc.pid)
        before = cpu_seconds(pids)
        completed, failed = drive(port, args.connections, args.threads, with_header)
        return Result(completed, failed, cpu_seconds(pids) - before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20000, help="per case and repeat")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[Result]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="echod-proxy-cost-") as scratch:
        for repeat in range(args.repeat):
            for case in CASES:
                result = measure(case, args, Path(scratch))
                results[case].append(result)
                print(
                    f"[{repeat + 1}/{args.repeat}] {case:9} {result.connections} connections, "
                    f"{result.failures} failed, {result.us_per_connection:.1f} us server CPU each",
                    flush=True,
                )
    base = statistics.median(r.us_per_connection for r in results["off"])
    print("\ncase       server CPU us/connection (median)   ratio to off   failed")
    for case, runs in results.items():
        median = statistics.median(r.us_per_connection for r in runs)
        failed = sum(r.failures for r in runs)
        ratio = f"{median / base:12.2f}" if base else f"{'-':>12}"  # too few ticks to divide
        print(f"{case:9}  {median:33.1f}   {ratio}   {failed:6}")
    return 1 if any(r.failures for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
