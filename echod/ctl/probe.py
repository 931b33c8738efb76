"""The probe engine: send payloads to an echo server and verify every reply byte.

`iter_probes()` drives a run (one probe after another, ping-like) and yields
each `ProbeResult` as it completes, plus `ProbeEvent`s for things that happen
outside a probe's own exchange (a UDP duplicate, a late reply, the server
closing an idle connection). `ProbeSummary.from_outcomes()` turns them into
counts, rtt statistics and an exit status. `echoctl send` prints them;
`echoctl check` judges them against thresholds; anything else (a health check,
a test) can use the same three calls.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from echod import exitcodes
from echod.addresses import format_host_port
from echod.ctl.output import format_ms
from echod.ctl.payload import describe_mismatch
from echod.ctl.stats import RttStats
from echod.datagram import MAX_UDP_PAYLOAD_IPV4
from echod.errors import EchodError

# Each UDP datagram starts with this header so that any reply identifies the
# probe it answers, even when it arrives late, twice or out of order.
UDP_HEADER = struct.Struct(">4sI")
UDP_MAGIC = b"ECHO"
MAX_UDP_DATAGRAM = MAX_UDP_PAYLOAD_IPV4
MAX_UDP_PAYLOAD = MAX_UDP_DATAGRAM - UDP_HEADER.size

_RECV_SIZE = 65536
# How many already-queued datagrams one drain reads at most, so a flooding
# server cannot keep us in the loop forever.
_MAX_DRAIN = 1024

EventKind = Literal["duplicate", "late", "unexpected", "closed"]


class ProbeTargetError(EchodError):
    """The target cannot be resolved, so nothing can answer: exit 2, like a refusal."""

    exit_code = exitcodes.NO_ANSWER


@dataclass(frozen=True)
class Target:
    """Where to probe, as the user named it."""

    host: str
    port: int
    udp: bool = False

    @property
    def protocol(self) -> str:
        return "udp" if self.udp else "tcp"

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)


@dataclass(frozen=True)
class ResolvedTarget:
    """A target with the socket address the probes actually go to."""

    target: Target
    family: int
    sockaddr: tuple[Any, ...]

    @property
    def address(self) -> str:
        return format_host_port(self.sockaddr[0], self.sockaddr[1])

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.target.host,
            "port": self.target.port,
            "protocol": self.target.protocol,
            "address": self.address,
        }


def resolve(target: Target) -> ResolvedTarget:
    """Look the host up once; raises ProbeTargetError (exit 2) when it cannot be."""
    socktype = socket.SOCK_DGRAM if target.udp else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socktype)
    except socket.gaierror as exc:
        raise ProbeTargetError(f"cannot resolve {target.host}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return ResolvedTarget(target=target, family=family, sockaddr=sockaddr)


@dataclass(frozen=True)
class ProbeSettings:
    payload: bytes
    count: int = 1
    interval_s: float = 1.0  # between probe starts; no wait after the last one
    timeout_s: float = 2.0  # per probe, connecting included
    connect_each: bool = False  # TCP: a new connection per probe (tcping-like)


@dataclass
class ProbeResult:
    """One probe: what was sent, what came back, how long it took, what was wrong."""

    seq: int
    sent_bytes: int
    received_bytes: int = 0
    rtt_ms: float | None = None
    connect_ms: float | None = None
    error: str | None = None  # None means the echo came back complete and exact
    answered: bool = False  # the server sent something back, right or wrong

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "rtt_ms": _round_ms(self.rtt_ms),
            "connect_ms": _round_ms(self.connect_ms),
            "ok": self.ok,
            "error": self.error,
        }


@dataclass(frozen=True)
class ProbeEvent:
    """Something the server did outside the exchange of the probe under way."""

    kind: EventKind
    seq: int | None  # the probe it belongs to, when known
    received_bytes: int = 0
    rtt_ms: float | None = None  # since that probe was sent
    detail: str | None = None  # what was wrong with the bytes, if anything
    fault: bool = True  # the server misbehaved (the run does not exit 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq": self.seq,
            "bytes": self.received_bytes,
            "rtt_ms": _round_ms(self.rtt_ms),
            "detail": self.detail,
            "fault": self.fault,
        }


ProbeOutcome = ProbeResult | ProbeEvent


def iter_probes(resolved: ResolvedTarget, settings: ProbeSettings) -> Iterator[ProbeOutcome]:
    """Run the probes one after another, yielding results and events as they happen.

    Probe k+1 starts `interval_s` after probe k started (at once if k took
    longer). Replies arriving between probes are read while waiting, so
    duplicates and late replies are reported next to the probe they follow.
    Closing the generator (or an exception such as KeyboardInterrupt) closes
    the socket.
    """
    session: _Session
    if resolved.target.udp:
        session = _UdpSession(resolved, settings)
    else:
        session = _TcpSession(resolved, settings)
    try:
        next_start = time.monotonic()
        for seq in range(1, settings.count + 1):
            if seq > 1:
                session.wait_until(next_start)
                yield from session.take_events()
            next_start = time.monotonic() + settings.interval_s
            result = session.probe(seq, time.monotonic() + settings.timeout_s)
            yield from session.take_events()
            yield result
        # Pick up what has already arrived (a duplicate of the last reply,
        # say) without making the run any longer.
        session.wait_until(time.monotonic())
        yield from session.take_events()
    finally:
        session.close()


@dataclass
class ProbeSummary:
    sent: int = 0
    received: int = 0  # probes whose echo came back complete and exact
    wrong: int = 0  # probes answered with wrong bytes
    lost: int = 0  # probes never answered (timeout, refused, reset)
    duplicates: int = 0
    late: int = 0
    unexpected: int = 0
    faults: int = 0  # events that count against the server
    rtt: RttStats | None = None
    interrupted: bool = False
    anything_answered: bool = False

    @classmethod
    def from_outcomes(
        cls, outcomes: list[ProbeOutcome], *, interrupted: bool = False
    ) -> ProbeSummary:
        summary = cls(interrupted=interrupted)
        rtts: list[float] = []
        for outcome in outcomes:
            if isinstance(outcome, ProbeResult):
                summary.sent += 1
                summary.anything_answered |= outcome.answered
                if outcome.ok:
                    summary.received += 1
                    if outcome.rtt_ms is not None:
                        rtts.append(outcome.rtt_ms)
                elif outcome.answered:
                    summary.wrong += 1
                else:
                    summary.lost += 1
            else:
                summary.faults += outcome.fault
                if outcome.kind == "duplicate":
                    summary.duplicates += 1
                elif outcome.kind == "late":
                    summary.late += 1
                    summary.anything_answered = True
                elif outcome.kind == "unexpected":
                    summary.unexpected += 1
        summary.rtt = RttStats.from_samples(rtts)
        return summary

    @property
    def loss_percent(self) -> float:
        if not self.sent:
            return 100.0
        return 100.0 * (self.sent - self.received) / self.sent

    @property
    def exit_code(self) -> int:
        """0 every probe echoed exactly; 2 nothing answered at all; 1 anything in between."""
        if not self.anything_answered:
            return exitcodes.NO_ANSWER
        if self.received == self.sent and not self.faults:
            return exitcodes.OK
        return exitcodes.FAILURE

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "received": self.received,
            "wrong": self.wrong,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "late": self.late,
            "unexpected": self.unexpected,
            "loss_percent": round(self.loss_percent, 3),
            "rtt_ms": self.rtt.to_json() if self.rtt else None,
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
        }


def _round_ms(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3


def _os_error_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


@dataclass
class _Session:
    resolved: ResolvedTarget
    settings: ProbeSettings
    events: list[ProbeEvent] = field(default_factory=list)

    def probe(self, seq: int, deadline: float) -> ProbeResult:
        raise NotImplementedError

    def wait_until(self, deadline: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def take_events(self) -> list[ProbeEvent]:
        taken, self.events = self.events, []
        return taken


@dataclass
class _TcpSession(_Session):
    """TCP probes over one connection, or one connection per probe with connect_each.

    After a failed probe the byte stream can no longer be trusted, so the
    connection is dropped and the next probe opens a new one.
    """

    sock: socket.socket | None = None

    def probe(self, seq: int, deadline: float) -> ProbeResult:
        payload = self.settings.payload
        result = ProbeResult(seq=seq, sent_bytes=len(payload))
        server_closed = False
        try:
            if self.sock is None:
                connect_started = time.perf_counter()
                self.sock = self._connect(deadline)
                if self.settings.connect_each:
                    result.connect_ms = _elapsed_ms(connect_started)
            server_closed = _tcp_exchange(self.sock, payload, deadline, result)
        except TimeoutError:
            result.error = f"connect timed out after {self.settings.timeout_s * 1e3:.0f} ms"
        except OSError as exc:
            prefix = "connect failed" if self.sock is None else "error"
            result.error = f"{prefix}: {_os_error_text(exc)}"
        if self.sock is not None and (result.error or self.settings.connect_each):
            self._disconnect()
        elif server_closed:
            self.events.append(ProbeEvent(kind="closed", seq=seq, fault=False))
            self._disconnect()
        return result

    def wait_until(self, deadline: float) -> None:
        """Sleep until the deadline, noticing anything the server sends unasked."""
        while self.sock is not None:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                readable = _wait_readable(self.sock, remaining)
                if not readable:
                    return
                data = self.sock.recv(_RECV_SIZE)
            except OSError:
                self._disconnect()
                break
            if data:
                detail = f"{len(data)} bytes arrived that no probe asked for"
                self.events.append(
                    ProbeEvent(kind="unexpected", seq=None, received_bytes=len(data), detail=detail)
                )
            else:
                self.events.append(ProbeEvent(kind="closed", seq=None, fault=False))
            self._disconnect()
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)

    def close(self) -> None:
        self._disconnect()

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(self.resolved.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(self.resolved.sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _wait_readable(sock: socket.socket, timeout_s: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout_s))


def _tcp_exchange(
    sock: socket.socket, payload: bytes, deadline: float, result: ProbeResult
) -> bool:
    """Send `payload` and read back exactly as many bytes, verifying them as they come.

    Sending and receiving are interleaved, so a payload larger than the socket
    buffers cannot deadlock against a server that echoes while we still send.
    Fills in `result`; returns True when the server closed the connection
    right after a complete echo.
    """
    expected = memoryview(payload)
    total = len(payload)
    sent = 0
    received = 0
    started = time.perf_counter()
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while received < total:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.error = f"timeout after {(time.perf_counter() - started) * 1e3:.0f} ms"
                if received:
                    result.error += f" ({received} of {total} bytes came back)"
                return False
            for _, mask in selector.select(remaining):
                if mask & selectors.EVENT_WRITE and sent < total:
                    try:
                        sent += sock.send(expected[sent : sent + _RECV_SIZE])
                    except BlockingIOError:
                        pass
                    if sent == total:
                        selector.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(_RECV_SIZE)
                    except BlockingIOError:
                        continue
                    if not data:
                        result.error = (
                            f"connection closed by the server after {received} of {total} bytes"
                        )
                        return False
                    result.answered = True
                    echoed = data[: total - received]
                    mismatch = describe_mismatch(
                        expected[received : received + len(echoed)], echoed, base_offset=received
                    )
                    received += len(echoed)
                    result.received_bytes = received + len(data) - len(echoed)
                    if mismatch:
                        result.error = f"wrong reply: {mismatch}"
                        return False
                    if len(data) > len(echoed):
                        extra = len(data) - len(echoed)
                        result.error = f"wrong reply: {extra} extra bytes after the {total} sent"
                        return False
        result.rtt_ms = _elapsed_ms(started)
        # An echo server sends back exactly what it got: bytes already waiting
        # beyond the payload make the reply wrong.
        try:
            extra = sock.recv(_RECV_SIZE) if _wait_readable(sock, 0) else None
        except OSError:
            return True
        if extra:
            result.received_bytes = total + len(extra)
            result.error = f"wrong reply: {len(extra)} extra bytes after the {total} sent"
            return False
        return extra == b""


@dataclass
class _UdpSession(_Session):
    """UDP probes from one connected socket, replies matched by the header's seq."""

    sock: socket.socket = field(init=False)
    sent_at: dict[int, float] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.sock = socket.socket(self.resolved.family, socket.SOCK_DGRAM)
        # Connecting filters out datagrams from anyone but the server and
        # turns an ICMP port-unreachable into ECONNREFUSED on recv.
        try:
            self.sock.connect(self.resolved.sockaddr)
        except BaseException:
            self.sock.close()
            raise

    def datagram(self, seq: int) -> bytes:
        return UDP_HEADER.pack(UDP_MAGIC, seq) + self.settings.payload

    def probe(self, seq: int, deadline: float) -> ProbeResult:
        datagram = self.datagram(seq)
        result = ProbeResult(seq=seq, sent_bytes=len(datagram))
        started = time.perf_counter()
        self.sent_at[seq] = started
        try:
            self.sock.send(datagram)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result.error = f"timeout after {_elapsed_ms(started):.0f} ms"
                    return result
                self.sock.settimeout(remaining)
                try:
                    reply = self.sock.recv(_RECV_SIZE)
                except TimeoutError:
                    continue
                reply_seq = self._seq_of(reply)
                if reply_seq is not None and reply_seq != seq:
                    self._stray_reply(reply_seq, reply)
                    continue
                # Ours, or so mangled that it names no other probe: judge it
                # as the answer to the probe under way.
                result.rtt_ms = _elapsed_ms(started)
                result.answered = True
                result.received_bytes = len(reply)
                self.answered.add(seq)
                mismatch = describe_mismatch(datagram, reply)
                if mismatch:
                    result.rtt_ms = None
                    result.error = f"wrong reply: {mismatch}"
                return result
        except ConnectionRefusedError:
            result.error = "connection refused (port unreachable)"
        except OSError as exc:
            result.error = f"error: {_os_error_text(exc)}"
        return result

    def wait_until(self, deadline: float) -> None:
        for _ in range(_MAX_DRAIN):
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    self.sock.settimeout(remaining)
                else:
                    self.sock.setblocking(False)
                reply = self.sock.recv(_RECV_SIZE)
            except (TimeoutError, BlockingIOError):
                return
            except OSError:
                # An ICMP error for an earlier probe; that probe already knows.
                continue
            reply_seq = self._seq_of(reply)
            if reply_seq is None:
                detail = f"{len(reply)} bytes that match no probe sent"
                self.events.append(
                    ProbeEvent(
                        kind="unexpected", seq=None, received_bytes=len(reply), detail=detail
                    )
                )
            else:
                self._stray_reply(reply_seq, reply)

    def close(self) -> None:
        self.sock.close()

    def _seq_of(self, reply: bytes) -> int | None:
        """The seq a reply names, if it names a probe that was sent."""
        if len(reply) < UDP_HEADER.size:
            return None
        magic, seq = UDP_HEADER.unpack_from(reply)
        return seq if magic == UDP_MAGIC and seq in self.sent_at else None

    def _stray_reply(self, seq: int, reply: bytes) -> None:
        """A reply to an earlier probe: a duplicate if that one was answered, else late."""
        kind: EventKind = "duplicate" if seq in self.answered else "late"
        self.answered.add(seq)
        self.events.append(
            ProbeEvent(
                kind=kind,
                seq=seq,
                received_bytes=len(reply),
                rtt_ms=(time.perf_counter() - self.sent_at[seq]) * 1e3,
                detail=describe_mismatch(self.datagram(seq), reply),
            )
        )


def describe_event(event: ProbeEvent, address: str) -> str:
    """One ping-like line for an event."""
    if event.kind in ("duplicate", "late"):
        note = "DUP!" if event.kind == "duplicate" else "late: after its timeout"
        line = f"{event.received_bytes} bytes from {address}: seq={event.seq}"
        if event.rtt_ms is not None:
            line += f" time={format_ms(event.rtt_ms)} ms"
        line += f" ({note})"
        if event.detail:
            line += f" wrong reply: {event.detail}"
        return line
    if event.kind == "closed":
        return f"{address} closed the connection; the next probe reconnects"
    return f"unexpected reply from {address}: {event.detail}"
