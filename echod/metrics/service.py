"""The ``/metrics`` endpoint: the HTTP server of a small child process.

Why a process and not the master's loop: rendering reads psutil for every worker
and a scraper may be slow or hostile; none of that may delay the master's
supervision or put it at risk. The master owns the socket and supervises this
process (``echod.server.metrics_child``); the child serves the socket and reads
the scoreboard mapping it inherited. It never outlives the master (master-alive
pipe, PR_SET_PDEATHSIG as a backstop). It runs only while ``metrics_bind`` is
set (``max_worker_memory`` is each worker's own check: ``echod.server.worker``).

HTTP is the standard library's ``http.server``: its request-line and header
parsing, status lines and error answers. What it leaves to us is what a
hostile client could abuse, so that is here: a bounded number of clients (a
slot is taken before ``accept()``, the rest wait in the kernel's backlog), one
deadline for the whole request head however slowly it trickles in, one byte
budget for it however the bytes are split, one request per connection, and a
lingering close so that our answer is never lost to a reset.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from socketserver import BaseServer, ThreadingMixIn
from urllib.parse import urlsplit

from echod import logs, procname
from echod.metrics import health, render
from echod.scoreboard import Scoreboard

log = logging.getLogger("echod.metrics")

BACKLOG = 64
MAX_CLIENTS = 32  # more wait in the kernel's backlog
MAX_REQUEST = 8192  # bytes of request head: request line, headers, the empty line
CLIENT_TIMEOUT = 5.0  # seconds for a client to send its request head
LINGER = 1.0  # seconds to take an answer, and to wait for the client's FIN after it
SLOT_WAIT = 1.0  # seconds between looks at the master while every client slot is taken
ACCEPT_PAUSE = 0.5  # seconds to back off after accept() fails (EMFILE and friends)
PATHS = ("/metrics", "/healthz", "/readyz")
NOT_FOUND = "not found: try /metrics\n"  # any other path, whatever the method
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


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
    MetricsHTTPServer(sock, board, master_alive_fd, master_pid).serve_until_master_exits()


# -- reading a request head ----------------------------------------------------------------


class RequestTimeout(Exception):
    """The request head did not arrive within CLIENT_TIMEOUT."""


class HeadTooLarge(Exception):
    """The request head is over MAX_REQUEST bytes."""


class DeadlineSocketReader(io.RawIOBase):
    """A socket's bytes, with one deadline for all of them.

    A socket timeout alone bounds each recv(): a client sending a byte every few
    seconds would hold its slot for ever. Each read here may wait only for the
    time the request has left.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            raise RequestTimeout from None


class BudgetedLines:
    """The lines of a request head, MAX_REQUEST bytes of them in all: the budget is
    on the head, wherever the recv() boundaries fall (12 KiB in one write and 10 KiB
    in 1000-byte pieces are both too large). The only reads http.server makes of
    a request are ``readline(limit)``."""

    def __init__(self, stream: io.BufferedReader, budget: int) -> None:
        self.stream = stream
        self.left = budget

    def readline(self, limit: int = -1) -> bytes:
        allowed = self.left + 1 if limit < 0 else min(limit, self.left + 1)
        line = self.stream.readline(allowed)
        self.left -= len(line)
        if self.left < 0:
            raise HeadTooLarge
        return line

    def close(self) -> None:
        self.stream.close()


# -- answering one request -----------------------------------------------------------------


class MetricsRequestHandler(BaseHTTPRequestHandler):
    """GET/HEAD of /metrics, /healthz and /readyz; one request per connection."""

    server: MetricsHTTPServer
    protocol_version = "HTTP/1.1"  # in our status lines; we still close after each answer
    default_request_version = "HTTP/1.1"  # not 0.9, which answers without a status line
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s: %(explain)s\n"

    def setup(self) -> None:
        super().setup()
        self.deadline = time.monotonic() + CLIENT_TIMEOUT
        self.rfile.close()  # the library's plain reader: ours has the deadline and the budget
        raw = DeadlineSocketReader(self.connection, self.deadline)
        self.rfile = BudgetedLines(io.BufferedReader(raw), MAX_REQUEST)  # type: ignore[assignment]
        # An answer may be due before a request line has been parsed (408, 431).
        self.command, self.requestline = None, ""  # type: ignore[assignment]
        self.request_version = self.default_request_version

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except RequestTimeout:
            self.send_error(HTTPStatus.REQUEST_TIMEOUT)
        except HeadTooLarge:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        self.close_connection = True

    def parse_request(self) -> bool:
        # Every answer gets a status line: a request line without an HTTP version
        # (HTTP/0.9) or a blank one is a bad request, not a request for a bare body.
        if len(self.raw_requestline.split()) != 3:
            self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad request line")
            return False
        return super().parse_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The status line keeps the standard reason phrase, never the client's
        # bytes that http.server puts in its messages; the detail goes in the body.
        super().send_error(code, None, explain or message)

    def flush_headers(self) -> None:
        # Answering: whatever time the request has left, and at least LINGER.
        self.connection.settimeout(max(self.deadline - time.monotonic(), LINGER))
        super().flush_headers()

    def do_GET(self) -> None:
        path = self._path()
        if path == "/metrics":
            scrape = self.server.expose(
                self.headers.get("Accept", ""), self.headers.get("Accept-Encoding", "")
            )
            headers = {"Vary": "Accept, Accept-Encoding"}
            if scrape.gzipped:
                headers["Content-Encoding"] = "gzip"
            self._answer(HTTPStatus.OK, scrape.body, scrape.content_type, headers)
        elif path == "/healthz":
            self._answer(*self.server.healthz())
        elif path == "/readyz":
            self._answer(*self.server.readyz())
        elif path is None:
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad request target")
        else:
            self._answer(HTTPStatus.NOT_FOUND, NOT_FOUND)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if self._path() in PATHS:
            self._answer(
                HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD\n", headers={"Allow": "GET, HEAD"}
            )
        else:
            self._answer(HTTPStatus.NOT_FOUND, NOT_FOUND)

    # The other methods RFC 9110 defines are known but not allowed; any other is
    # answered 501 by http.server.
    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = do_POST

    def _path(self) -> str | None:
        """The path of an origin-form or absolute-form target (RFC 9112 section 3.2.2:
        a server must accept ``http://host:port/metrics`` as well as ``/metrics``)."""
        try:
            return urlsplit(self.path).path
        except ValueError:
            return None

    def _answer(
        self,
        status: int,
        body: bytes | str,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        content = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def version_string(self) -> str:
        return "echod"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics: %s %s", self.address_string(), format % args)


# -- the server: client slots, accept, lingering close -------------------------------------


class MetricsHTTPServer(ThreadingMixIn, BaseServer):
    """http.server's handler on the socket the master bound, a thread per client."""

    daemon_threads = True  # a stuck client never holds up our exit
    block_on_close = False

    def __init__(
        self, listener: socket.socket, board: Scoreboard, master_alive_fd: int, master_pid: int
    ) -> None:
        super().__init__(listener.getsockname(), MetricsRequestHandler)
        self.listener = listener
        self.listener.setblocking(False)
        self.board = board
        self.master_alive_fd = master_alive_fd
        self.master_pid = master_pid
        self.client_slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.registry = render.registry_for(
            render.ScoreboardCollector(board, render.ProcessSampler(), None)
        )
        self.render_lock = threading.Lock()  # the sampler keeps psutil objects between scrapes
        # poll, not select: no FD_SETSIZE ceiling on the descriptors we inherited
        self.client_or_master = select.poll()
        self.client_or_master.register(listener, select.POLLIN)
        self.client_or_master.register(master_alive_fd, select.POLLIN)
        self.master_only = select.poll()
        self.master_only.register(master_alive_fd, select.POLLIN)

    def serve_until_master_exits(self) -> None:
        """Take a client slot, wait for a client or the master's end, hand the client
        to a thread (which gives the slot back when it is done); loop."""
        if os.getppid() != self.master_pid:
            return  # the master died while we started
        while True:
            if not self.client_slots.acquire(timeout=SLOT_WAIT):
                if self._master_gone(0):
                    return
                continue  # all slots taken: the rest wait in the backlog
            ready = {fd for fd, _ in self.client_or_master.poll()}
            if self.master_alive_fd in ready:
                return  # EOF: the master is gone
            self._accept()

    def _accept(self) -> None:
        try:
            conn, address = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            self.client_slots.release()  # the client left before we took it
            return
        except OSError as exc:  # EMFILE and friends: pause like the workers do
            self.client_slots.release()
            log.warning("metrics: accept failed: %s", exc.strerror)
            self._master_gone(ACCEPT_PAUSE)
            return
        try:
            self.process_request(conn, address)
        except RuntimeError as exc:  # no thread to serve it
            log.warning("metrics: cannot serve a client: %s", exc)
            self.shutdown_request(conn)

    def _master_gone(self, wait: float) -> bool:
        return bool(self.master_only.poll(wait * 1000))

    def expose(self, accept: str, accept_encoding: str) -> render.Exposition:
        with self.render_lock:
            return render.expose(self.registry, accept, accept_encoding)

    def healthz(self) -> tuple[int, str]:
        return health.healthz(self.board.master(), self.master_pid)

    def readyz(self) -> tuple[int, str]:
        return health.readyz(self.board.snapshot(), self.master_pid)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        """After the answer: shut our side and read until the client's FIN (at most
        LINGER), so unread request bytes never turn our close into a reset that eats
        the answer; then give the client slot back."""
        try:
            with contextlib.suppress(OSError):  # timeouts and resets included
                request.shutdown(socket.SHUT_WR)
                until = time.monotonic() + LINGER
                while (left := until - time.monotonic()) > 0:
                    request.settimeout(left)
                    if not request.recv(4096):
                        break
            request.close()
        finally:
            self.client_slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that reset or stalled mid-answer: nothing for the operator to do.
        log.debug("metrics: client %s: %s", client_address, sys.exc_info()[1])
