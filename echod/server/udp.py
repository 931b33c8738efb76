"""UDP echo (RFC 862): one reply datagram per datagram, same bytes, sent from the
address the datagram arrived on, with the checks that keep an echo service from
being used as a reflector (CERT CA-1996-01).

Every worker reads the shared UDP sockets in batches: one ``recvmmsg`` reads up
to BATCH datagrams and one ``sendmmsg`` answers them (see ``echod.server.mmsg``).
A socket bound to a specific address lets the kernel pick that address as the
replies' source. A wildcard socket (0.0.0.0, [::]) on a host with several
addresses could answer from the wrong one, so it asks for the destination of
each datagram (IP_PKTINFO / IPV6_RECVPKTINFO) and names it as the source of the
reply.

Datagrams the kernel drops because the socket's receive buffer is full never
reach us. The socket's cumulative drop count (sk_drops, shared by every worker
reading that socket) is read with SO_MEMINFO at each housekeeping tick, off the
datagram path. Where SO_MEMINFO is missing (Linux before 4.6), SO_RXQ_OVFL has
the kernel attach the same count to each datagram received after a drop; those
sockets, and every socket where the batch calls are missing, are read one
datagram at a time into one preallocated buffer (``recvmsg_into``), answered
with ``sendto`` or, naming the source, ``sendmsg``. Each DatagramEcho keeps the
highest count it saw; the worker publishes it per socket (see
``echod.scoreboard``).

Checks, in order, cheapest first; a datagram failing one is dropped silently and
counted by reason:

1. source port 0, 7, 13, 17, 19, 37 or ``udp_deny_source_ports`` (services that
   answer by themselves: echo/chargen/daytime/... loops);
2. a source that cannot be a unicast sender: IPv4 0.0.0.0/8, 224.0.0.0/4
   (multicast) and 240.0.0.0/4 (reserved, includes 255.255.255.255); IPv6 ::
   and ff00::/8. A subnet's directed-broadcast address looks like any unicast
   address from here (knowing it means knowing every remote subnet's mask), so it
   is not filtered; the kernel drops such martians on input anyway;
3. ``allow`` / ``deny`` (when configured);
4. the per-source token bucket, then the global one (when configured; shared by
   every worker and exact, see ``ratelimit``).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Callable

from echod.cidr import AddressPolicy
from echod.config import Config
from echod.datagram import MAX_UDP_PAYLOAD_IPV4, MAX_UDP_PAYLOAD_IPV6
from echod.limits.ratelimit import (
    ADMIT,
    OVER_SOURCE_RATE,
    OVER_TOTAL_RATE,
    SharedBuckets,
    source_key,
)
from echod.scoreboard import Counter
from echod.server import mmsg
from echod.server.mmsg import IP_PKTINFO

REFLECTOR_PORTS = frozenset({0, 7, 13, 17, 19, 37})  # echo, daytime, qotd, chargen, time
BUFFER_SIZE = 65536  # every possible datagram fits: none is ever truncated
assert max(MAX_UDP_PAYLOAD_IPV4, MAX_UDP_PAYLOAD_IPV6) < BUFFER_SIZE
BATCH = 64  # datagrams per wake-up, so one busy socket cannot starve the others
assert mmsg.DatagramBatch.SIZE == BATCH

SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # Linux; not in every Python build
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)  # Linux >= 4.6: u32 sk_meminfo[]
_MEMINFO = struct.Struct("=9I")  # SK_MEMINFO_RMEM_ALLOC .. SK_MEMINFO_DROPS
_MEMINFO_DROPS = 8
UNICAST_CACHE = 1024  # sources whose check 2 verdict is remembered (then forgotten at once)
_PKTINFO_SPACE = socket.CMSG_SPACE(20)  # in6_pktinfo, the larger of the two
_DROPS_SPACE = socket.CMSG_SPACE(4)  # SO_RXQ_OVFL's uint32

_RECEIVED = int(Counter.UDP_RECEIVED)
_SENT = int(Counter.UDP_SENT)
_BYTES_IN = int(Counter.UDP_BYTES_IN)
_BYTES_OUT = int(Counter.UDP_BYTES_OUT)
_DROPPED_PORT = int(Counter.UDP_DROPPED_PORT)
_DROPPED_ADDRESS = int(Counter.UDP_DROPPED_ADDRESS)
_DROPPED_RATE = int(Counter.UDP_DROPPED_RATE)
_DROPPED_RATE_TOTAL = int(Counter.UDP_DROPPED_RATE_TOTAL)
_ERRORS = int(Counter.ERRORS)

# first octets of IPv4 sources that are never unicast senders
_NOT_UNICAST_V4 = frozenset(str(octet) for octet in (0, *range(224, 256)))
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
# a batch's sources: (port, address) from sockaddr_in, (port, address + scope id)
# from sockaddr_in6; the address is the key of the hosts seen
_SOURCE_V4 = struct.Struct("!2xHI8x")
_SOURCE_V6 = struct.Struct("!2xH4x20s")

Ancillary = list[tuple[int, int, bytes]]  # recvmsg's control messages
# host, now -> 0 (pass) or the counter index of the reason to drop
SourceCheck = Callable[[str, float], int]


def is_unicast_source_v4(host: str) -> bool:
    return host[: host.find(".")] not in _NOT_UNICAST_V4


def is_unicast_source_v6(host: str) -> bool:
    if host.startswith("ff") and host.find(":") == 4:
        return False  # ff00::/8: a first group of four digits starting ff
    if host == "::":
        return False
    if host.startswith("::ffff:"):  # maybe an IPv4 client of a dual-stack socket
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        if packed[:12] == _V4_MAPPED_PREFIX:
            return is_unicast_source_v4(socket.inet_ntoa(packed[12:]))
    return True


def build_source_check(
    config: Config, buckets: SharedBuckets | None, policy: AddressPolicy | None
) -> SourceCheck | None:
    """The optional checks (3 and 4 above) as one function, or None when none is on."""
    permits = policy.permits if policy is not None else None
    rate, burst = float(config.udp_rate_per_source), float(config.udp_burst_per_source)
    total = float(config.udp_rate_total)
    limiter = (
        buckets.limiter(rate, burst, total, total)
        if buckets is not None and (rate or total)
        else None
    )  # the global bucket bursts up to one second's worth
    if permits is None and limiter is None:
        return None
    drop_reasons = {OVER_SOURCE_RATE: _DROPPED_RATE, OVER_TOTAL_RATE: _DROPPED_RATE_TOTAL}
    key_of = source_key  # bound here: read for every datagram

    def check(host: str, now: float) -> int:
        if permits is not None and not permits(host):
            return _DROPPED_ADDRESS
        if limiter is not None and (verdict := limiter(key_of(host), now)) != ADMIT:
            return drop_reasons[verdict]
        return 0

    return check


def _host_of(address: int | bytes) -> str:
    """A batch's raw source address (see _SOURCE_V4/_V6) as recvfrom would name it:
    "fe80::1%eth0" for a link-local IPv6 one."""
    if isinstance(address, int):
        return socket.inet_ntoa(address.to_bytes(4, "big"))
    scope = int.from_bytes(address[16:], sys.byteorder)
    text = socket.inet_ntop(socket.AF_INET6, address[:16])
    return socket.getnameinfo((text, 0, 0, scope), socket.NI_NUMERICHOST)[0]


def read_kernel_drops(sock: socket.socket) -> int | None:
    """The socket's cumulative drop count (SO_MEMINFO), or None where unavailable."""
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return None
    if len(data) < _MEMINFO.size:
        return None
    return int(_MEMINFO.unpack(data)[_MEMINFO_DROPS])


def is_wildcard(sock: socket.socket) -> bool:
    try:
        host = sock.getsockname()[0]
    except OSError:
        return False
    return host in ("0.0.0.0", "::")


class DatagramEcho:
    """Answers the datagrams waiting on one UDP socket."""

    def __init__(
        self,
        sock: socket.socket,
        config: Config,
        check: SourceCheck | None,
        buffer: bytearray,
        counters: list[int],
        batch: mmsg.DatagramBatch | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.check = check
        self.buffer = buffer
        self.view = memoryview(buffer)
        self.counters = counters
        self.deny_ports = REFLECTOR_PORTS | frozenset(config.udp_deny_source_ports)
        self.ipv6 = sock.family == socket.AF_INET6
        self.is_unicast = is_unicast_source_v6 if self.ipv6 else is_unicast_source_v4
        self.inode = os.fstat(sock.fileno()).st_ino  # the socket's identity in the scoreboard
        self.kernel_drops = 0  # the highest drop count seen on this socket
        # check 2's verdicts, by source: its host, or "" when it is not unicast. Keyed
        # by the raw address in batches, by the host string one datagram at a time
        self.hosts: dict[int | bytes | str, str] = {}
        self.sources = _SOURCE_V6 if self.ipv6 else _SOURCE_V4
        self.drops_by_meminfo = read_kernel_drops(sock) is not None
        if not self.drops_by_meminfo:
            # idempotent, like PKTINFO below; where the kernel lacks it, no drop is counted
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
            except OSError:
                pass
        self.with_pktinfo = is_wildcard(sock)
        # a batch reads no drop count: SO_MEMINFO must give it
        batched = batch is not None and self.drops_by_meminfo
        # chosen once: the loop calls on_readable for every wake-up
        assert batch is None or bool(batch.control_size) == self.with_pktinfo
        self.batch = batch if batched else None
        self.on_readable = self._answer_batch if batched else self._answer_with_ancillary
        self.ancillary_space = _DROPS_SPACE + (_PKTINFO_SPACE if self.with_pktinfo else 0)
        if self.with_pktinfo:
            # idempotent: every worker sets it on the shared socket before serving
            if self.ipv6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)

    def refresh_drops(self) -> None:
        """Read the socket's drop count (housekeeping: once per tick, not per datagram)."""
        if self.drops_by_meminfo:
            count = read_kernel_drops(self.sock)
            if count is not None and count > self.kernel_drops:
                self.kernel_drops = count

    def _answer_batch(self) -> None:
        """Answer up to BATCH waiting datagrams in one recvmmsg and (usually) one
        sendmmsg; a wildcard socket's replies name their datagram's destination."""
        batch, counters = self.batch, self.counters
        assert batch is not None
        try:
            count = batch.receive(self.fd)
        except OSError:
            counters[_ERRORS] += 1
            return
        if not count:
            return
        lengths = batch.lengths(count)
        if self.with_pktinfo:
            batch.reply_from_destination(count)
        sources = self.sources.iter_unpack(batch.names_view[: count * batch.name_size])
        deny_ports, hosts, check = self.deny_ports, self.hosts, self.check
        reply_lengths = batch.reply_lengths
        now = time.monotonic() if check is not None else 0.0
        refused: list[int] = []
        run = 0  # the first slot of the run of datagrams to answer, sent as one
        dropped = dropped_bytes = 0
        # checks 1-4 of the module docstring, in order; written out, not called:
        # this runs for every datagram
        for slot, (port, address), length in zip(range(count), sources, lengths, strict=True):
            if port in deny_ports:
                reason = _DROPPED_PORT
            else:
                host = hosts.get(address)
                if host is None:
                    host = self._learn(address, _host_of(address))
                if not host:
                    reason = _DROPPED_ADDRESS
                elif check is None or not (reason := check(host, now)):
                    reply_lengths[2 * slot + 1] = length
                    continue
            counters[reason] += 1
            dropped += 1
            dropped_bytes += length
            if run < slot:
                refused += batch.send(self.fd, run, slot)
            run = slot + 1
        if run < count:
            refused += batch.send(self.fd, run, count)
        bytes_in = sum(lengths)
        counters[_ERRORS] += len(refused)  # send buffer full or the route vanished
        counters[_RECEIVED] += count
        counters[_BYTES_IN] += bytes_in
        counters[_SENT] += count - dropped - len(refused)
        counters[_BYTES_OUT] += bytes_in - dropped_bytes - sum(lengths[slot] for slot in refused)

    def _learn(self, key: int | bytes | str, host: str) -> str:
        """Check 2 for a new source: its host, or "" when it cannot be a unicast
        sender, remembered for the next datagrams (a bounded number of sources)."""
        if len(self.hosts) >= UNICAST_CACHE:
            self.hosts.clear()
        self.hosts[key] = verdict = host if self.is_unicast(host) else ""
        return verdict

    def _answer_with_ancillary(self) -> None:
        """Answer up to BATCH waiting datagrams with recvmsg: a wildcard socket
        (with_pktinfo) answers from the address each datagram was sent to, and
        without SO_MEMINFO the drop count comes as a control message."""
        with_pktinfo, view = self.with_pktinfo, self.view
        # more control messages than PKTINFO's: a drop count is attached
        usual_cmsgs, space = int(with_pktinfo), self.ancillary_space
        sendto = self.sock.sendto
        recvmsg, sendmsg, buffers = self.sock.recvmsg_into, self.sock.sendmsg, [self.buffer]
        reply_from = _reply_pktinfo_v6 if self.ipv6 else _reply_pktinfo_v4
        deny_ports, hosts, check = self.deny_ports, self.hosts, self.check
        counters = self.counters
        now = time.monotonic() if check is not None else 0.0
        received = sent = bytes_in = bytes_out = 0
        for _ in range(BATCH):
            try:
                size, ancillary, _flags, source = recvmsg(buffers, space)
            except BlockingIOError:
                break
            except OSError:
                counters[_ERRORS] += 1
                break
            if len(ancillary) > usual_cmsgs:
                self._note_drops(ancillary)
            received += 1
            bytes_in += size
            # checks 1-4 of the module docstring, in order; written out, not called:
            # this runs for every datagram
            if source[1] in deny_ports:
                counters[_DROPPED_PORT] += 1
                continue
            host = source[0]
            verdict = hosts.get(host)
            if verdict is None:
                verdict = self._learn(host, host)
            if not verdict:
                counters[_DROPPED_ADDRESS] += 1
                continue
            if check is not None and (reason := check(host, now)):
                counters[reason] += 1
                continue
            try:
                if with_pktinfo:
                    sendmsg((view[:size],), reply_from(ancillary), 0, source)
                else:
                    sendto(view[:size], source)
            except OSError:  # send buffer full or the route vanished: UDP may drop
                counters[_ERRORS] += 1
                continue
            sent += 1
            bytes_out += size
        counters[_RECEIVED] += received
        counters[_BYTES_IN] += bytes_in
        counters[_SENT] += sent
        counters[_BYTES_OUT] += bytes_out

    def _note_drops(self, ancillary: Ancillary) -> None:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
                count = int.from_bytes(data[:4], sys.byteorder)
                if count > self.kernel_drops:  # datagrams are read out of order by workers
                    self.kernel_drops = count


def _reply_pktinfo_v4(ancillary: Ancillary) -> Ancillary:
    """in_pktinfo {ifindex, spec_dst, addr}: reply from the local address the kernel
    reports for this datagram (spec_dst: its destination, or for a broadcast the
    interface's own address); ifindex 0 lets routing choose the way back."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return [(socket.IPPROTO_IP, IP_PKTINFO, bytes(4) + data[4:8] + bytes(4))]
    return []  # no pktinfo (queued before the option was set): the kernel chooses


def _reply_pktinfo_v6(ancillary: Ancillary) -> Ancillary:
    """in6_pktinfo {addr, ifindex}: reply from the destination address; keep the
    interface only for link-local addresses, which mean nothing without it."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            link_local = data[0] == 0xFE and data[1] & 0xC0 == 0x80
            pktinfo = data[:20] if link_local else data[:16] + bytes(4)
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
    return []


def datagram_echoes(
    socks: list[socket.socket], config: Config, check: SourceCheck | None, counters: list[int]
) -> dict[int, DatagramEcho]:
    """A worker's DatagramEcho for each UDP socket, by file descriptor. They share
    one buffer, and one batch per kind of socket (family, wildcard or not): a
    worker reads one socket at a time."""
    buffer = bytearray(BUFFER_SIZE)
    calls = mmsg.load()
    batches: dict[tuple[int, bool], mmsg.DatagramBatch] = {}
    echoes = {}
    for sock in socks:
        batch = None
        if calls is not None:
            kind = (sock.family, is_wildcard(sock))
            if kind not in batches:
                batches[kind] = mmsg.DatagramBatch(calls, BUFFER_SIZE, *kind)
            batch = batches[kind]
        echoes[sock.fileno()] = DatagramEcho(sock, config, check, buffer, counters, batch)
    return echoes
