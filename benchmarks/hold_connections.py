#!/usr/bin/env python3
"""Hold N idle TCP connections to an echo server, each proven served twice.

One client process of benchmarks/hold100k.py (a process can hold at most its
RLIMIT_NOFILE descriptors). Opens ``--count`` connections from ``--source``
(a loopback address of its own: one source address has ~28k ephemeral ports
per server port), at most ``--in-flight`` handshakes at a time, and checks each
with a 1-byte echo. Then prints one JSON line ``{"established": n, ...}`` and
waits for a line on stdin; on it, checks every connection again with a 1-byte
echo and prints ``{"alive": n, "dropped": n, "unanswered": n}``, then closes
them all and exits.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import select
import socket
import sys
import time

from bench_procs import raise_nofile

BYTE = b"k"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2


def open_all(
    port: int, source: str, count: int, in_flight: int, timeout: float
) -> list[socket.socket]:
    """Connect and echo one byte on each; returns the connections that answered."""
    poller = select.epoll()
    pending: dict[int, tuple[socket.socket, int]] = {}  # fd -> (sock, stage 0 connect / 1 echo)
    done: list[socket.socket] = []
    started = 0
    deadline = time.monotonic() + timeout
    while (started < count or pending) and time.monotonic() < deadline:
        while started < count and len(pending) < in_flight:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            # the port is chosen at connect, per destination: bind()'s own search for
            # a port free on the source address slows down as thousands are taken
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            code = sock.connect_ex(("127.0.0.1", port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                raise OSError(code, f"connect: {errno.errorcode.get(code, code)}")
            pending[sock.fileno()] = (sock, 0)
            poller.register(sock.fileno(), select.EPOLLOUT)
            started += 1
        for fd, mask in poller.poll(0.1):
            sock, stage = pending[fd]
            if stage == 0:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or mask & select.EPOLLERR:
                    raise OSError(f"connection {len(done)} failed to open")
                sock.send(BYTE)
                pending[fd] = (sock, 1)
                poller.modify(fd, select.EPOLLIN)
            else:
                if sock.recv(1) != BYTE:
                    raise OSError("wrong echo at setup")
                poller.unregister(fd)
                del pending[fd]
                done.append(sock)
    poller.close()
    for sock, _stage in pending.values():
        sock.close()
    return done


def check_all(socks: list[socket.socket], timeout: float) -> dict[str, int]:
    poller = select.epoll()
    waiting: dict[int, socket.socket] = {}
    dropped = 0
    for sock in socks:
        try:
            sock.send(BYTE)
        except OSError:
            dropped += 1
            continue
        waiting[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN)
    alive = 0
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for fd, _mask in poller.poll(0.1):
            sock = waiting.pop(fd)
            poller.unregister(fd)
            try:
                answer = sock.recv(1)
            except OSError:
                answer = b""
            if answer == BYTE:
                alive += 1
            else:
                dropped += 1
    poller.close()
    return {"alive": alive, "dropped": dropped, "unanswered": len(waiting)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--source", default="127.0.0.1")
    ap.add_argument("--in-flight", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    raise_nofile(resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # soft up to the hard limit
    started = time.monotonic()
    socks = open_all(a.port, a.source, a.count, a.in_flight, a.timeout)
    took = time.monotonic() - started
    print(json.dumps({"established": len(socks), "seconds": round(took, 3)}), flush=True)
    sys.stdin.readline()
    print(json.dumps(check_all(socks, a.timeout)), flush=True)
    for sock in socks:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
