"""Echo servers for testing echoctl: a correct one, and deliberately broken ones.

`EchoServer` serves TCP and UDP on 127.0.0.1 (ports picked by the kernel) from
one background thread with a selector loop. A `Misbehaviour` makes it wrong in
one precise way so tests can check that echoctl notices.

    with EchoServer() as server:
        run echoctl against server.tcp_port / server.udp_port
    with EchoServer(Misbehaviour(flip_at=5)) as server:
        ...
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
FLIP_MASK = 0x20  # flips ASCII case, so 'A' (0x41) comes back as 'a' (0x61)

# Stop reading from a TCP client while this much is waiting to be echoed to
# it, so a client that never reads cannot make the test process grow.
_MAX_PENDING = 1 << 20


@dataclass(frozen=True)
class Misbehaviour:
    """How the server deviates from RFC 862 (the default: not at all)."""

    flip_at: int | None = None  # XOR FLIP_MASK into the byte at this offset of each
    # TCP connection's stream / each UDP datagram
    flip_every: int | None = None  # TCP: flip one byte in every this many
    drop_last_byte: bool = False  # TCP: swallow the last byte of every read
    extra: bytes = b""  # appended to every TCP echo chunk / UDP reply
    silent: bool = False  # read everything, answer nothing
    close_on_read: bool = False  # TCP: close the connection instead of answering
    udp_duplicate: bool = False  # answer every datagram twice
    udp_drop_every: int = 0  # drop every Nth datagram (1-based), 0 = none
    delay_s: float = 0.0  # hold every reply this long


@dataclass(eq=False)
class _TcpClient:
    sock: socket.socket
    received: int = 0  # stream offset of the next byte read
    pending: bytearray = field(default_factory=bytearray)
    peer_done: bool = False  # the client shut down its write side
    events: int = selectors.EVENT_READ


class EchoServer:
    """A TCP + UDP echo server on loopback, running in a daemon thread."""

    def __init__(self, misbehaviour: Misbehaviour | None = None) -> None:
        self.misbehaviour = misbehaviour or Misbehaviour()
        self._listener = socket.create_server((LOOPBACK, 0), backlog=128)
        self._listener.setblocking(False)
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((LOOPBACK, 0))
        self._udp.setblocking(False)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._udp, selectors.EVENT_READ, "udp")
        self._selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        self._clients: set[_TcpClient] = set()
        self._datagrams_seen = 0
        # Replies held back by delay_s: (due, tiebreak, client or UDP address, bytes)
        self._delayed: list[tuple[float, int, object, bytes]] = []
        self._tiebreak = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="echo-server", daemon=True)
        self.tcp_port: int = self._listener.getsockname()[1]
        self.udp_port: int = self._udp.getsockname()[1]
        self.connections_accepted = 0

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for client in list(self._clients):
            client.sock.close()
        for sock in (self._listener, self._udp, self._wake_reader, self._wake_writer):
            sock.close()
        self._selector.close()

    # The loop: every wait is bounded by the next delayed reply or a wake-up.
    def _serve(self) -> None:
        while not self._stopping.is_set():
            timeout = None
            if self._delayed:
                timeout = max(0.0, self._delayed[0][0] - time.monotonic())
            for key, mask in self._selector.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "udp":
                    self._on_datagram()
                elif key.data == "wake":
                    self._wake_reader.recv(64)
                else:
                    self._on_client(key.data, mask)
            self._release_delayed()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        client = _TcpClient(sock)
        self._clients.add(client)
        self.connections_accepted += 1
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _on_client(self, client: _TcpClient, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                data = client.sock.recv(65536)
                if not data:
                    client.peer_done = True
                elif self.misbehaviour.close_on_read:
                    self._drop(client)
                    return
                else:
                    self._reply_tcp(client, data)
            if mask & selectors.EVENT_WRITE and client.pending:
                sent = client.sock.send(client.pending)
                del client.pending[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)
            return
        self._update_interest(client)

    def _reply_tcp(self, client: _TcpClient, data: bytes) -> None:
        offset = client.received
        client.received += len(data)
        reply = self._corrupt(bytearray(data), offset)
        if self.misbehaviour.drop_last_byte:
            del reply[-1:]
        reply += self.misbehaviour.extra
        if self.misbehaviour.silent:
            return
        if self.misbehaviour.delay_s:
            self._hold(client, bytes(reply))
        else:
            client.pending += reply

    def _corrupt(self, data: bytearray, offset: int) -> bytearray:
        flip_at, flip_every = self.misbehaviour.flip_at, self.misbehaviour.flip_every
        if flip_at is not None and offset <= flip_at < offset + len(data):
            data[flip_at - offset] ^= FLIP_MASK
        if flip_every:
            first = (-offset - 1) % flip_every  # index of stream offset k*N - 1
            for index in range(first, len(data), flip_every):
                data[index] ^= FLIP_MASK
        return data

    def _update_interest(self, client: _TcpClient) -> None:
        if client not in self._clients:
            return
        if client.peer_done and not client.pending and not self._delayed_for(client):
            self._drop(client)
            return
        wanted = 0
        if not client.peer_done and len(client.pending) < _MAX_PENDING:
            wanted |= selectors.EVENT_READ
        if client.pending:
            wanted |= selectors.EVENT_WRITE
        if wanted == client.events:
            return
        if client.events and wanted:
            self._selector.modify(client.sock, wanted, client)
        elif client.events:
            self._selector.unregister(client.sock)
        else:
            self._selector.register(client.sock, wanted, client)
        client.events = wanted

    def _delayed_for(self, client: _TcpClient) -> bool:
        return any(target is client for _, _, target, _ in self._delayed)

    def _drop(self, client: _TcpClient) -> None:
        if client.events:
            self._selector.unregister(client.sock)
            client.events = 0
        client.sock.close()
        self._clients.discard(client)

    def _on_datagram(self) -> None:
        try:
            data, address = self._udp.recvfrom(65536)
        except (BlockingIOError, InterruptedError):
            return
        self._datagrams_seen += 1
        behaviour = self.misbehaviour
        if behaviour.silent:
            return
        if behaviour.udp_drop_every and self._datagrams_seen % behaviour.udp_drop_every == 0:
            return
        reply = bytes(self._corrupt(bytearray(data), 0)) + behaviour.extra
        for _ in range(2 if behaviour.udp_duplicate else 1):
            if behaviour.delay_s:
                self._hold(address, reply)
            else:
                self._udp.sendto(reply, address)

    def _hold(self, target: object, reply: bytes) -> None:
        due = time.monotonic() + self.misbehaviour.delay_s
        heapq.heappush(self._delayed, (due, next(self._tiebreak), target, reply))

    def _release_delayed(self) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, target, reply = heapq.heappop(self._delayed)
            if isinstance(target, _TcpClient):
                if target in self._clients:
                    target.pending += reply
                    self._update_interest(target)
            else:
                self._udp.sendto(reply, target)


def refused_tcp_port() -> tuple[socket.socket, int]:
    """A loopback port that refuses connections for as long as the socket stays open.

    Bound but not listening: nothing else can take the port, and connecting
    gets an immediate RST. The caller closes the socket.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    return sock, sock.getsockname()[1]


def unused_udp_port() -> int:
    """A loopback UDP port with nobody on it (datagrams get ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]
