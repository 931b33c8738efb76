"""The ``/metrics`` endpoint: the HTTP loop of a small child process.

Why a process and not the master's loop: rendering reads psutil for every worker
and a scraper may be slow or hostile; none of that may delay the master's
supervision or put it at risk. The master owns the socket and supervises this
process (``echod.server.metrics_child``); the child serves the socket and reads
the scoreboard mapping it inherited. It never outlives the master (master-alive
pipe, PR_SET_PDEATHSIG as a backstop). It runs only while ``metrics_bind`` is
set (``max_worker_memory`` is each worker's own check: ``echod.server.worker``).

HTTP is the minimum a scraper needs: ``GET``/``HEAD /metrics`` on HTTP/1.0 or
1.1, one request per connection (``Connection: close``), requests of at most
8 KiB that must arrive within 5 s, a bounded number of clients at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from echod import logs, procname
from echod.metrics import health, render
from echod.scoreboard import Scoreboard

log = logging.getLogger("echod.metrics")

BACKLOG = 64
MAX_CLIENTS = 32  # more wait in the kernel's backlog
MAX_REQUEST = 8192  # bytes of request line + headers
CLIENT_TIMEOUT = 5.0  # seconds for a client to send its request and take the answer
LINGER = 1.0  # seconds to wait for the client's FIN after our answer (no RST on close)
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def run_metrics_process(
    sock: socket.socket,
    bound: str,
    board: Scoreboard,
    master_alive_fd: int,
    master_pid: int,
    blocked_signals: Iterable[signal.Signals],
) -> None:
    """In the freshly forked metrics child (already cleaned up by the master's side)."""
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked_signals)  # blocked across fork()
    logs.set_role("metrics")
    procname.set_title(f"metrics (http://{bound}/metrics)")
    procname.die_with_parent()
    MetricsServer(sock, board, master_alive_fd, master_pid).run()


# -- the metrics process ------------------------------------------------------------------


@dataclass(eq=False)
class HttpClient:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    response: memoryview | None = None
    lingering: bool = False  # answer sent and our side shut: waiting for the client's FIN


class MetricsServer:
    def __init__(
        self, sock: socket.socket, board: Scoreboard, master_alive_fd: int, master_pid: int
    ) -> None:
        self.sock = sock
        self.board = board
        self.master_alive_fd = master_alive_fd
        self.master_pid = master_pid
        self.epoll = select.epoll()
        self.clients: dict[int, HttpClient] = {}
        self.accepting = False
        self.registry = render.registry_for(
            render.ScoreboardCollector(board, render.ProcessSampler(), render.descriptor_limit())
        )

    def run(self) -> None:
        if os.getppid() != self.master_pid:
            return  # the master died while we started
        self.epoll.register(self.master_alive_fd, select.EPOLLIN)
        self._accepting(True)
        listening = self.sock.fileno()
        while True:
            timeout = min((c.deadline for c in self.clients.values()), default=None)
            wait = 1.0 if timeout is None else max(0.0, min(1.0, timeout - time.monotonic()))
            for fd, mask in self.epoll.poll(wait):
                if fd == self.master_alive_fd:
                    return  # EOF: the master is gone
                if fd == listening:
                    self._accept()
                elif fd in self.clients:
                    self._on_event(self.clients[fd], mask)
            now = time.monotonic()
            self._expire(now)

    def _accepting(self, on: bool) -> None:
        if on and not self.accepting:
            self.epoll.register(self.sock.fileno(), select.EPOLLIN)
        elif not on and self.accepting:
            self.epoll.unregister(self.sock.fileno())
        self.accepting = on

    def _accept(self) -> None:
        while len(self.clients) < MAX_CLIENTS:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: pause like the workers do
                log.warning("metrics: accept failed: %s", exc.strerror)
                return
            sock.setblocking(False)
            client = HttpClient(sock, time.monotonic() + CLIENT_TIMEOUT)
            self.clients[sock.fileno()] = client
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        self._accepting(False)  # full: the rest wait in the backlog

    def _on_event(self, client: HttpClient, mask: int) -> None:
        if client.response is not None:
            self._write(client)
            return
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        if client.lingering:
            if not data:
                self._drop(client)
            return
        if not data:
            self._drop(client)  # left before asking anything
            return
        client.request += data
        end = client.request.find(b"\r\n\r\n")
        if end < 0:
            end = client.request.find(b"\n\n")
        # The limit is on the head itself, wherever the recv() boundaries fall:
        # 12 KiB in one write and 10 KiB in 1000-byte pieces are both too large.
        if (end >= 0 and end > MAX_REQUEST) or (end < 0 and len(client.request) > MAX_REQUEST):
            self._respond(client, 431, b"request too large\n")
        elif end >= 0:
            self._answer(client, bytes(client.request[:end]))

    def _answer(self, client: HttpClient, head: bytes) -> None:
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._respond(client, 400, b"bad request\n")
            return
        method, target, _ = parts
        path = _origin_path(target)
        head_only = method == b"HEAD"
        if path not in (b"/metrics", b"/healthz", b"/readyz"):
            self._respond(client, 404, b"not found: try /metrics\n")
        elif method not in (b"GET", b"HEAD"):
            self._respond(client, 405, b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
        elif path == b"/healthz":
            status, text = health.healthz(self.board.master(), self.master_pid)
            self._respond(client, status, text.encode(), head_only=head_only)
        elif path == b"/readyz":
            status, text = health.readyz(self.board.snapshot(), self.master_pid)
            self._respond(client, status, text.encode(), head_only=head_only)
        else:
            headers = _header_fields(head)
            scrape = render.expose(
                self.registry, headers.get("accept", ""), headers.get("accept-encoding", "")
            )
            extra = "Vary: Accept, Accept-Encoding\r\n"
            if scrape.gzipped:
                extra += "Content-Encoding: gzip\r\n"
            self._respond(
                client,
                200,
                scrape.body,
                content_type=scrape.content_type,
                extra=extra,
                head_only=head_only,
            )

    def _respond(
        self,
        client: HttpClient,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        extra: str = "",
        head_only: bool = False,
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {STATUS_TEXT[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        ).encode()
        client.response = memoryview(head if head_only else head + body)
        self.epoll.modify(client.sock.fileno(), select.EPOLLOUT)
        self._write(client)

    def _write(self, client: HttpClient) -> None:
        assert client.response is not None
        try:
            sent = client.sock.send(client.response)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        client.response = client.response[sent:]
        if client.response:
            return
        # Done: shut our side and read until the client's FIN, so that unread
        # request bytes never turn our close into a reset that eats the answer.
        client.response = None
        client.lingering = True
        client.deadline = min(client.deadline, time.monotonic() + LINGER)
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        self.epoll.modify(client.sock.fileno(), select.EPOLLIN)

    def _expire(self, now: float) -> None:
        for client in list(self.clients.values()):
            if now < client.deadline:
                continue
            if client.lingering or client.response is not None:
                self._drop(client)
            else:
                self._respond(client, 408, b"request timeout\n")
                client.deadline = now + LINGER  # a last chance to take the 408

    def _drop(self, client: HttpClient) -> None:
        fd = client.sock.fileno()
        self.clients.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)
        client.sock.close()
        if not self.accepting and len(self.clients) < MAX_CLIENTS:
            self._accepting(True)


def _origin_path(target: bytes) -> bytes:
    """The path of an origin-form or absolute-form target (RFC 9112 section 3.2.2:
    a server must accept ``http://host:port/metrics`` as well as ``/metrics``)."""
    lowered = target[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        rest = target.split(b"//", 1)[1]
        slash = rest.find(b"/")
        target = rest[slash:] if slash >= 0 else b"/"
    return target.split(b"?", 1)[0]


def _header_fields(head: bytes) -> dict[str, str]:
    """Header fields by lower-cased name (the last one wins); undecodable bytes are
    replaced, since only Accept and Accept-Encoding are read and both are ASCII."""
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        name, colon, value = line.partition(":")
        if colon:
            fields[name.strip().lower()] = value.strip()
    return fields
