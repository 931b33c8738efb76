"""`echoctl bench`: a load generator for any TCP echo server.

Each bench client process runs many non-blocking connections on one selector
(epoll on Linux); -P forks several processes so that one Python interpreter
is not the bottleneck, and their reports are merged. ("Client", never
"worker": workers are the echod processes under test.) Every byte that comes
back is verified against a per-connection position in a seeded cyclic
pattern, so checking costs one slice comparison per read.

Modes:
  rr      request/response: send SIZE bytes, wait for all of them to come
          back, send the next SIZE bytes. Latency is per round trip.
  stream  keep up to a window of bytes in flight; SIZE is the chunk the
          rate is counted in. Latency is sampled per write: from sending a
          byte to reading it back.
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import multiprocessing.connection
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from echod import exitcodes
from echod.ctl import options
from echod.ctl.payload import DEFAULT_SEED, CyclicPattern, describe_mismatch
from echod.ctl.probe import Target, resolve
from echod.ctl.stats import LatencyHistogram

NAME = "bench"

Mode = Literal["rr", "stream"]

_IO_SIZE = 65536  # largest single send/recv; also the pattern's max chunk
_STREAM_WINDOW = 65536  # bytes in flight per stream connection (at least one chunk)
_TICK_S = 0.1  # how often stalled connections and progress are looked at
_MAX_ERROR_SAMPLES = 5
# After the run, how long the parent waits for client processes to report beyond the
# duration and timeout before it gives up on them.
_REPORT_GRACE_S = 5.0

EPILOG = """\
Every byte echoed is verified. Connections with a wrong byte or an error are
closed and counted; they are not reopened. MB/s counts echoed bytes (one
direction), 1 MB = 10^6 bytes. Latency percentiles come from a histogram with
1% wide buckets. Progress goes to stderr when it is a terminal.

exit status: 0 no error and no mismatch; 1 any error or mismatch;
2 nothing completed (for example: could not connect); 64 bad usage.

examples:
  echoctl bench                               10 connections, 64 bytes, 5 s
  echoctl bench -c 100 -s 1K -d 10 -P 2       two processes
  echoctl bench --mode stream -s 16K -c 4     throughput
  echoctl bench -H ::1 -p 7007 -d 2 --json    one JSON document
"""


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        NAME,
        help="load-test an echo server: rate, MB/s and latency percentiles",
        description="Load-test a TCP echo server and verify every byte it echoes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_target_options(parser)
    parser.add_argument(
        "-c",
        "--connections",
        type=options.positive_int,
        default=10,
        metavar="CONNS",
        help="concurrent connections in all (default 10)",
    )
    parser.add_argument(
        "-s",
        "--size",
        type=options.byte_size,
        default=64,
        help="message (rr) or chunk (stream) size in bytes, K/M suffix allowed (default 64)",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=options.positive_float,
        default=5.0,
        metavar="SECONDS",
        help="how long to run (default 5)",
    )
    parser.add_argument(
        "-P",
        "--processes",
        type=options.positive_int,
        default=1,
        help="bench processes sharing the connections (default 1)",
    )
    parser.add_argument(
        "--mode",
        choices=("rr", "stream"),
        default="rr",
        help="rr: request/response round trips (default); stream: continuous flow",
    )
    parser.add_argument(
        "-W",
        "--timeout",
        type=options.positive_float,
        default=5.0,
        metavar="SECONDS",
        help="a connection that connects or echoes nothing for this long is an error (default 5)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"pattern seed (default {DEFAULT_SEED})"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


@dataclass(frozen=True)
class BenchSettings:
    family: int
    sockaddr: tuple[Any, ...]
    connections: int
    size: int
    duration_s: float
    processes: int
    mode: Mode
    timeout_s: float
    seed: int


@dataclass
class ClientReport:
    """What one client process measured; reports merge by adding up."""

    completed_rr: int = 0  # round trips verified (rr mode)
    bytes_echoed: int = 0  # bytes verified
    chunks: int = 0  # whole chunks verified (stream mode)
    connected: int = 0
    errors: int = 0
    mismatches: int = 0
    elapsed_s: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    error_samples: list[str] = field(default_factory=list)

    def note_error(self, message: str, *, mismatch: bool = False) -> None:
        if mismatch:
            self.mismatches += 1
        else:
            self.errors += 1
        if len(self.error_samples) < _MAX_ERROR_SAMPLES:
            self.error_samples.append(message)


@dataclass(eq=False)
class _Connection:
    """One benchmark connection's place in its byte stream."""

    sock: socket.socket
    name: str
    stream_start: int  # where this connection starts in the shared pattern
    last_progress: float
    connected: bool = False
    sent: int = 0  # stream bytes written
    received: int = 0  # stream bytes read back and verified
    send_limit: int = 0  # write up to here (rr: end of this message; stream: window)
    # (stream offset, time) marks: once `received` reaches the offset, the
    # time since then is one latency sample.
    marks: deque[tuple[int, float]] = field(default_factory=deque)
    events: int = 0  # the selector mask currently registered


def run(args: argparse.Namespace) -> int:
    resolved = resolve(Target(args.host, args.port))
    settings = BenchSettings(
        family=resolved.family,
        sockaddr=resolved.sockaddr,
        connections=args.connections,
        size=args.size,
        duration_s=args.duration,
        processes=min(args.processes, args.connections),
        mode=args.mode,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    reports = run_bench(settings, show_progress=sys.stderr.isatty())
    result = BenchResult.from_reports(settings, reports)
    if args.json:
        print(json.dumps(result.to_json(resolved.address), indent=2))
    else:
        print(result.table(resolved.address))
    return result.exit_code


def run_bench(settings: BenchSettings, *, show_progress: bool = False) -> list[ClientReport]:
    """Fork the bench processes, wait (bounded) for their reports, reap them all."""
    context = multiprocessing.get_context("fork")
    progress = context.Array("q", settings.processes, lock=False)
    receivers: dict[multiprocessing.connection.Connection, int] = {}
    processes: list[multiprocessing.process.BaseProcess] = []
    reports: dict[int, ClientReport] = {}
    first_id = 0
    try:
        for index in range(settings.processes):
            share = _connections_for(index, settings)
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_client_main,
                args=(settings, index, first_id, share, sender, progress),
                name=f"echoctl-bench-{index}",
                daemon=True,
            )
            process.start()
            sender.close()  # only the child writes; EOF then means it died
            processes.append(process)
            receivers[receiver] = index
            first_id += share
        started = time.monotonic()
        give_up_at = started + settings.duration_s + settings.timeout_s + _REPORT_GRACE_S
        while receivers and time.monotonic() < give_up_at:
            wait_s = min(1.0, max(0.0, give_up_at - time.monotonic()))
            for ready in multiprocessing.connection.wait(list(receivers), timeout=wait_s):
                assert isinstance(ready, multiprocessing.connection.Connection)
                index = receivers.pop(ready)
                reports[index] = _receive_report(ready)
                ready.close()
            if show_progress:
                _show_progress(settings, started, sum(progress))
        for index in receivers.values():
            reports[index] = ClientReport()
            reports[index].note_error(f"bench process {index} did not report in time")
        if show_progress:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    except BaseException:
        # Ctrl-C or a failure here: the children ignore SIGINT, stop them now
        # rather than letting them run out the duration.
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        for receiver in receivers:
            receiver.close()
        _reap(processes)
    return [reports[index] for index in sorted(reports)]


def _connections_for(index: int, settings: BenchSettings) -> int:
    share, remainder = divmod(settings.connections, settings.processes)
    return share + (1 if index < remainder else 0)


def _receive_report(receiver: multiprocessing.connection.Connection) -> ClientReport:
    try:
        report = receiver.recv()
    except (EOFError, OSError):
        report = None
    if not isinstance(report, ClientReport):
        report = ClientReport()
        report.note_error("a bench process died without reporting")
    return report


def _reap(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Every child is gone when this returns: asked, then told, then killed."""
    for process in processes:
        process.join(timeout=1.0)
        if process.is_alive():
            process.terminate()
            process.join(timeout=1.0)
        if process.is_alive():
            process.kill()
            process.join()


def _show_progress(settings: BenchSettings, started: float, completed: int) -> None:
    elapsed = min(time.monotonic() - started, settings.duration_s)
    unit = "round trips" if settings.mode == "rr" else "bytes"
    sys.stderr.write(f"\r\033[K{elapsed:5.1f}/{settings.duration_s:g} s  {completed} {unit}")
    sys.stderr.flush()


def _client_main(
    settings: BenchSettings,
    index: int,
    first_id: int,
    connection_count: int,
    sender: multiprocessing.connection.Connection,
    progress: Any,
) -> None:
    # Ctrl-C is the parent's to handle: it stops and reaps us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = ClientReport()
    try:
        report = _ClientLoop(settings, index, first_id, connection_count, progress).run()
    except Exception as exc:  # reported, not raised: the parent must hear from us
        report.note_error(f"bench process {index}: {type(exc).__name__}: {exc}")
    try:
        sender.send(report)
    finally:
        sender.close()


class _ClientLoop:
    """One client process's event loop over its share of the connections."""

    def __init__(
        self,
        settings: BenchSettings,
        index: int,
        first_id: int,
        connection_count: int,
        progress: Any,
    ) -> None:
        self.settings = settings
        self.index = index
        self.first_id = first_id
        self.connection_count = connection_count
        self.progress = progress
        self.pattern = CyclicPattern(seed=settings.seed, max_chunk=_IO_SIZE)
        self.report = ClientReport()
        self.selector = selectors.DefaultSelector()
        self.connections: set[_Connection] = set()

    def run(self) -> ClientReport:
        started = time.monotonic()
        deadline = started + self.settings.duration_s
        try:
            for number in range(self.connection_count):
                self._open(self.first_id + number, started)
            next_tick = started + _TICK_S
            while self.connections:
                now = time.monotonic()
                if now >= deadline:
                    break
                for key, mask in self.selector.select(min(_TICK_S, deadline - now)):
                    self._on_ready(key.data, mask)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + _TICK_S
                    self._close_stalled(now)
                    self.progress[self.index] = self._progress_count()
            self.report.elapsed_s = min(time.monotonic(), deadline) - started
        finally:
            for conn in list(self.connections):
                self._close(conn)
            self.selector.close()
        if self.settings.mode == "stream":
            self.report.chunks = self.report.bytes_echoed // self.settings.size
        return self.report

    def _progress_count(self) -> int:
        if self.settings.mode == "rr":
            return self.report.completed_rr
        return self.report.bytes_echoed

    def _open(self, connection_id: int, now: float) -> None:
        sock = socket.socket(self.settings.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        # Spread connections over the pattern so that bytes delivered to the
        # wrong connection do not match there.
        start = connection_id * 4099 % self.pattern.period
        conn = _Connection(
            sock=sock, name=f"connection {connection_id}", stream_start=start, last_progress=now
        )
        self.connections.add(conn)
        error = sock.connect_ex(self.settings.sockaddr)
        if error not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._fail(conn, f"connect: {os.strerror(error)}")
            return
        self._register(conn, selectors.EVENT_WRITE)

    def _register(self, conn: _Connection, events: int) -> None:
        if events == conn.events:
            return
        if conn.events:
            self.selector.modify(conn.sock, events, conn)
        else:
            self.selector.register(conn.sock, events, conn)
        conn.events = events

    def _on_ready(self, conn: _Connection, mask: int) -> None:
        if conn not in self.connections:
            return
        try:
            if not conn.connected:
                self._finish_connect(conn)
                return
            if mask & selectors.EVENT_READ:
                self._read(conn)
            if conn in self.connections and mask & selectors.EVENT_WRITE:
                self._write(conn)
        except OSError as exc:
            self._fail(conn, f"{conn.name}: {exc.strerror or exc}")

    def _finish_connect(self, conn: _Connection) -> None:
        error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._fail(conn, f"connect: {os.strerror(error)}")
            return
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.connected = True
        conn.last_progress = time.monotonic()
        self.report.connected += 1
        self._extend_send_limit(conn, time.perf_counter())
        self._write(conn)

    def _extend_send_limit(self, conn: _Connection, now: float) -> None:
        size = self.settings.size
        if self.settings.mode == "rr":
            # The next message: from the end of the one just echoed.
            conn.send_limit = conn.received + size
            conn.marks.append((conn.send_limit, now))
        else:
            conn.send_limit = conn.received + max(size, _STREAM_WINDOW)

    def _write(self, conn: _Connection) -> None:
        if conn.sent < conn.send_limit:
            piece = min(conn.send_limit - conn.sent, _IO_SIZE)
            try:
                written = conn.sock.send(self.pattern.chunk(conn.stream_start + conn.sent, piece))
            except BlockingIOError:
                written = 0
            conn.sent += written
            if written and self.settings.mode == "stream":
                conn.marks.append((conn.sent, time.perf_counter()))
        wanted = selectors.EVENT_READ
        if conn.sent < conn.send_limit:
            wanted |= selectors.EVENT_WRITE
        self._register(conn, wanted)

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_IO_SIZE)
        except BlockingIOError:
            return
        if not data:
            self._fail(conn, f"{conn.name}: closed by the server after {conn.received} bytes")
            return
        outstanding = conn.sent - conn.received
        position = conn.stream_start + conn.received
        if len(data) > outstanding or not self.pattern.matches(position, data):
            expected = self.pattern.chunk(position, min(outstanding, len(data)))
            why = describe_mismatch(expected, data, base_offset=conn.received)
            self._fail(conn, f"{conn.name}: {why}", mismatch=True)
            return
        now = time.perf_counter()
        conn.received += len(data)
        conn.last_progress = time.monotonic()
        self.report.bytes_echoed += len(data)
        while conn.marks and conn.marks[0][0] <= conn.received:
            _, sent_at = conn.marks.popleft()
            self.report.latency.record(now - sent_at)
            if self.settings.mode == "rr":
                self.report.completed_rr += 1
        if self.settings.mode == "rr":
            if conn.received == conn.send_limit:
                self._extend_send_limit(conn, now)
        else:
            self._extend_send_limit(conn, now)
        self._write(conn)

    def _close_stalled(self, now: float) -> None:
        for conn in list(self.connections):
            waiting = not conn.connected or conn.received < conn.sent
            if waiting and now - conn.last_progress > self.settings.timeout_s:
                what = "connect" if not conn.connected else "echo"
                self._fail(conn, f"{conn.name}: no {what} for {self.settings.timeout_s:g} s")

    def _fail(self, conn: _Connection, message: str, *, mismatch: bool = False) -> None:
        self.report.note_error(message, mismatch=mismatch)
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()
        self.connections.discard(conn)


@dataclass
class BenchResult:
    settings: BenchSettings
    completed: int  # round trips (rr) or chunks (stream)
    bytes_echoed: int
    rate_per_s: float
    mb_per_s: float
    elapsed_s: float
    connected: int
    errors: int
    mismatches: int
    latency_ms: dict[str, float] | None
    error_samples: list[str]

    @classmethod
    def from_reports(cls, settings: BenchSettings, reports: Sequence[ClientReport]) -> BenchResult:
        completed = sum(r.completed_rr if settings.mode == "rr" else r.chunks for r in reports)
        # Each process ran its own clock; summing per-process rates does not
        # penalise a process that started a little later than the others.
        rate = sum(
            (r.completed_rr if settings.mode == "rr" else r.chunks) / r.elapsed_s
            for r in reports
            if r.elapsed_s > 0
        )
        mb_rate = sum(r.bytes_echoed / r.elapsed_s for r in reports if r.elapsed_s > 0) / 1e6
        samples: list[str] = []
        for report in reports:
            samples.extend(report.error_samples)
        return cls(
            settings=settings,
            completed=completed,
            bytes_echoed=sum(r.bytes_echoed for r in reports),
            rate_per_s=rate,
            mb_per_s=mb_rate,
            elapsed_s=max((r.elapsed_s for r in reports), default=0.0),
            connected=sum(r.connected for r in reports),
            errors=sum(r.errors for r in reports),
            mismatches=sum(r.mismatches for r in reports),
            latency_ms=LatencyHistogram.merged(r.latency for r in reports).summary_ms(),
            error_samples=samples[:_MAX_ERROR_SAMPLES],
        )

    @property
    def exit_code(self) -> int:
        # A mismatch means the server answered, wrongly: that is "broken" (1),
        # not "unreachable" (2), even if no round trip completed.
        if self.mismatches:
            return exitcodes.FAILURE
        if self.completed == 0:
            return exitcodes.NO_ANSWER
        return exitcodes.FAILURE if self.errors else exitcodes.OK

    @property
    def rate_label(self) -> str:
        return "round trips/s" if self.settings.mode == "rr" else "chunks/s"

    def table(self, address: str) -> str:
        s = self.settings
        rows = [
            ("target", f"{address} (tcp)"),
            (
                "mode",
                f"{s.mode}, {s.size} bytes, {s.connections} connections, "
                f"{s.processes} process{'es' if s.processes > 1 else ''}",
            ),
            ("duration", f"{self.elapsed_s:.2f} s"),
            ("connected", f"{self.connected}/{s.connections}"),
            ("completed", str(self.completed)),
            (self.rate_label, f"{self.rate_per_s:.1f}"),
            ("MB/s", f"{self.mb_per_s:.3f}"),
        ]
        if self.latency_ms is not None:
            rows.append(
                (
                    "latency ms",
                    "  ".join(
                        f"{name} {self.latency_ms[name]:.3f}"
                        for name in ("p50", "p90", "p99", "p99.9", "max")
                    ),
                )
            )
        else:
            rows.append(("latency ms", "-"))
        rows += [("errors", str(self.errors)), ("mismatches", str(self.mismatches))]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value}" for label, value in rows]
        lines += [f"  {sample}" for sample in self.error_samples]
        return "\n".join(lines)

    def to_json(self, address: str) -> dict[str, Any]:
        s = self.settings
        latency = None
        if self.latency_ms is not None:
            latency = {name: round(value, 6) for name, value in self.latency_ms.items()}
        return {
            "target": {"address": address, "protocol": "tcp"},
            "mode": s.mode,
            "size": s.size,
            "connections": s.connections,
            "processes": s.processes,
            "duration_s": s.duration_s,
            "elapsed_s": round(self.elapsed_s, 6),
            "connected": self.connected,
            "completed": self.completed,
            "rate_per_s": round(self.rate_per_s, 3),
            "rate_unit": self.rate_label,
            "bytes_echoed": self.bytes_echoed,
            "mb_per_s": round(self.mb_per_s, 6),
            "latency_ms": latency,
            "errors": self.errors,
            "mismatches": self.mismatches,
            "error_samples": self.error_samples,
            "exit_code": self.exit_code,
        }
