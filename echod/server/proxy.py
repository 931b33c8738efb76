"""The PROXY protocol header (HAProxy's ``proxy-protocol.txt``, versions 1 and 2),
parsed incrementally: a connection from a ``proxy_protocol_from`` source feeds
what it receives until the header is complete or proven malformed.

Pure: no sockets, no clock. :meth:`ProxyHeaderParser.feed` takes the bytes as
they arrive and answers :data:`NEED_MORE`, :class:`Done` or :class:`Malformed`.
The answer depends only on the bytes, never on how they were split: each check
looks at a fixed span of the header and is decided as soon as that span has
arrived, and a header is wrong at the first byte that proves it (a first byte
that can start neither signature is wrong at once). So the answer for the
whole stream is the answer for its first decisive prefix.

Versions are told apart by their signatures, as HAProxy's ``accept-proxy``
does: ``PROXY `` (text, one line ending in CRLF, at most 107 bytes) or the
12 bytes ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n`` (binary: version and command, family and
protocol, a 2-byte length, the addresses, then TLVs, which are skipped).

What the header says about the client:

* v1 ``TCP4`` / ``TCP6``, v2 ``PROXY`` with TCP over IPv4 / IPv6: that source
  address and port is the client.
* v1 ``UNKNOWN``, v2 ``LOCAL`` (a balancer's own health check), v2 ``PROXY``
  with an unspecified family or protocol, with AF_UNIX addresses, or with UDP
  (echod's connection is TCP): ``client`` is None and the real peer stays, as
  the specification allows and HAProxy does.

Size: a v1 line is at most 107 bytes (the specification). A v2 header is 16
bytes plus its length field, which could say 65535; it is refused above
:data:`MAX_HEADER` (16 KiB in all), the largest header HAProxy itself accepts
with its default ``tune.bufsize``. That holds the addresses (at most 216
bytes, AF_UNIX) and every TLV balancers send in practice (ALPN, authority,
unique ID, CRC32C, the SSL ones, even a client certificate), and bounds what a
half-sent header can hold per connection.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

V1_SIGNATURE = b"PROXY "  # "PROXY" and exactly one space
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN <39> <39> 65535 65535\r\n"
V2_FIXED_LENGTH = 16  # signature, version/command, family/protocol, length
MAX_HEADER = 16384  # bytes of a v2 header in all (see the module docstring)
# the protocol word with what must follow it (UNKNOWN may end the line at once)
V1_WORDS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
V1_UNKNOWN = b"UNKNOWN"
V1_PROTOCOL_START = len(V1_SIGNATURE)

_V2_COMMAND_LOCAL = 0x0
_V2_COMMAND_PROXY = 0x1
_V2_FAMILY_INET = 0x1
_V2_FAMILY_INET6 = 0x2
_V2_FAMILY_UNIX = 0x3
_V2_PROTOCOL_STREAM = 0x1
_V2_ADDRESS_LENGTH = {0x0: 0, _V2_FAMILY_INET: 12, _V2_FAMILY_INET6: 36, _V2_FAMILY_UNIX: 216}
_V2_PROTOCOLS = (0x0, 0x1, 0x2)  # unspecified, stream, datagram
_TLV_HEADER = 3  # type, 2-byte length
_PORTS = struct.Struct("!HH")

Client = tuple[str, int]


@dataclass(frozen=True, slots=True)
class NeedMore:
    """No decision yet: feed the next bytes."""


NEED_MORE = NeedMore()


@dataclass(frozen=True, slots=True)
class Done:
    """A complete, valid header of ``length`` bytes from the start of the stream."""

    length: int
    client: Client | None  # None: keep the real peer (LOCAL, UNKNOWN, unspecified, AF_UNIX)
    data_start: int  # where, in the chunk last fed, the bytes after the header begin


@dataclass(frozen=True, slots=True)
class Malformed:
    """Not a valid header: close the connection."""

    reason: str


ParseResult = NeedMore | Done | Malformed


class ProxyHeaderParser:
    """Feed a connection's first bytes until the answer is not :data:`NEED_MORE`.

    Holds at most :data:`MAX_HEADER` bytes, whatever is fed. Feeding after a
    final answer is a programming error.
    """

    __slots__ = ("_buffer", "_finished")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._finished = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> ParseResult:
        if self._finished:
            raise ValueError("the PROXY header was already decided")
        buffer = self._buffer
        before = len(buffer)
        buffer += chunk[: MAX_HEADER - before]
        result = parse(buffer)
        if isinstance(result, Done):
            self._finished = True
            self._buffer = bytearray()
            return Done(result.length, result.client, result.length - before)
        if isinstance(result, Malformed):
            self._finished = True
            self._buffer = bytearray()
        return result


def parse(data: bytes | bytearray) -> ParseResult:
    """The answer for a stream that so far consists of ``data`` (``data_start`` is
    the header's length: the offset of what follows it in ``data``)."""
    if not data:
        return NEED_MORE
    first = data[0]
    if first == V1_SIGNATURE[0]:
        return _parse_v1(data)
    if first == V2_SIGNATURE[0]:
        return _parse_v2(data)
    return Malformed("not a PROXY protocol signature")


def _signature_mismatch(data: bytes | bytearray, signature: bytes) -> bool:
    seen = min(len(data), len(signature))
    return data[:seen] != signature[:seen]


# -- version 1 ------------------------------------------------------------------------
def _parse_v1(data: bytes | bytearray) -> ParseResult:
    if _signature_mismatch(data, V1_SIGNATURE):
        return Malformed("not a PROXY protocol signature")
    # Two checks may decide before the line is complete: the protocol word and the
    # line's end. Each fails at a byte position; reporting the earlier failure
    # makes the answer independent of how the bytes arrived.
    failures = [
        failure
        for failure in (_v1_protocol_failure(data), _v1_line_end_failure(data))
        if failure is not None
    ]
    if failures:
        return Malformed(min(failures)[1])
    end = data.find(b"\r\n", V1_PROTOCOL_START)
    if end < 0:
        return NEED_MORE
    # Past both checks, the word is complete: a CR inside it would have failed it
    return _v1_fields(bytes(data[:end]), end + 2)


def _v1_protocol_failure(data: bytes | bytearray) -> tuple[int, str] | None:
    """(position, reason) if the protocol word is not TCP4, TCP6 or UNKNOWN;
    None if it is, or if the bytes so far do not tell yet."""
    longest = max(len(word) for word in V1_WORDS)
    seen = data[V1_PROTOCOL_START : V1_PROTOCOL_START + longest]
    for offset in range(len(seen)):
        prefix = seen[: offset + 1]
        if prefix in V1_WORDS:
            return None
        if not any(word.startswith(prefix) for word in V1_WORDS):
            return V1_PROTOCOL_START + offset, "v1: unknown protocol (not TCP4, TCP6, UNKNOWN)"
    return None


def _v1_line_end_failure(data: bytes | bytearray) -> tuple[int, str] | None:
    """(position, reason) if the line cannot end in a CRLF within V1_MAX_LENGTH bytes."""
    last = V1_MAX_LENGTH - 1  # the LF of a longest line
    for position in range(V1_PROTOCOL_START, min(len(data), V1_MAX_LENGTH)):
        byte = data[position]
        if byte == 0x0A:
            return position, "v1: line ends in LF without CR"
        if byte == 0x0D:
            if position == last:
                break
            if position + 1 < len(data) and data[position + 1] != 0x0A:
                return position + 1, "v1: CR not followed by LF"
            return None
    if len(data) > last:
        return last, f"v1: no CRLF within {V1_MAX_LENGTH} bytes"
    return None


def _v1_fields(line: bytes, length: int) -> ParseResult:
    parts = line.split(b" ")
    if parts[1] == V1_UNKNOWN:
        return Done(length, None, length)  # the rest of the line is to be ignored
    if len(parts) != 6:
        return Malformed("v1: expected PROXY TCP4|TCP6 SRC DST SPORT DPORT, one space apart")
    _, protocol, source, destination, source_port, destination_port = parts
    family = socket.AF_INET if protocol == b"TCP4" else socket.AF_INET6
    host = _v1_address(family, source)
    if host is None or _v1_address(family, destination) is None:
        return Malformed(f"v1: bad {protocol.decode()} address")
    port = _v1_port(source_port)
    if port is None or _v1_port(destination_port) is None:
        return Malformed("v1: bad port (0-65535, decimal, no leading zero)")
    return Done(length, (host, port), length)


def _v1_address(family: int, text: bytes) -> str | None:
    """The address in canonical form, or None: inet_pton refuses leading zeros,
    short IPv4 forms and scope suffixes, as the specification asks."""
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text.decode("ascii")))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _v1_port(text: bytes) -> int | None:
    if not text or len(text) > 5 or not text.isdigit() or (text[0] == 0x30 and len(text) > 1):
        return None
    port = int(text)
    return port if port <= 65535 else None


# -- version 2 ------------------------------------------------------------------------
def _parse_v2(data: bytes | bytearray) -> ParseResult:
    if _signature_mismatch(data, V2_SIGNATURE):
        return Malformed("not a PROXY protocol signature")
    if len(data) <= 12:
        return NEED_MORE
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        return Malformed(f"v2: version {version}, not 2")
    if command not in (_V2_COMMAND_LOCAL, _V2_COMMAND_PROXY):
        return Malformed(f"v2: unknown command {command:#x}")
    if len(data) <= 13:
        return NEED_MORE
    family, protocol = data[13] >> 4, data[13] & 0x0F
    # A LOCAL header's family is to be ignored, whatever it says
    if command == _V2_COMMAND_PROXY and (
        family not in _V2_ADDRESS_LENGTH or protocol not in _V2_PROTOCOLS
    ):
        return Malformed(f"v2: unknown family/protocol {data[13]:#04x}")
    if len(data) < V2_FIXED_LENGTH:
        return NEED_MORE
    body = int.from_bytes(data[14:16], "big")
    length = V2_FIXED_LENGTH + body
    if length > MAX_HEADER:
        return Malformed(f"v2: header of {length} bytes, over the {MAX_HEADER} accepted")
    # LOCAL, or an unspecified family or protocol: the block is skipped unread
    # (the specification says to ignore it); otherwise addresses, then TLVs.
    known_layout = command == _V2_COMMAND_PROXY and family != 0 and protocol != 0
    addresses = _V2_ADDRESS_LENGTH[family] if known_layout else 0
    if body < addresses:
        return Malformed(f"v2: {body} address bytes, fewer than the family's {addresses}")
    if len(data) < length:
        return NEED_MORE
    if not known_layout:
        return Done(length, None, length)
    tlv_problem = _tlv_problem(data, V2_FIXED_LENGTH + addresses, length)
    if tlv_problem is not None:
        return Malformed(tlv_problem)
    client = _v2_client(data, family) if protocol == _V2_PROTOCOL_STREAM else None
    return Done(length, client, length)


def _v2_client(data: bytes | bytearray, family: int) -> Client | None:
    """The source address and port of TCP over IPv4 / IPv6; None for AF_UNIX and
    an unspecified family (the real peer stays)."""
    start = V2_FIXED_LENGTH
    if family == _V2_FAMILY_INET:
        host = socket.inet_ntop(socket.AF_INET, bytes(data[start : start + 4]))
        port, _ = _PORTS.unpack_from(data, start + 8)
        return host, port
    if family == _V2_FAMILY_INET6:
        host = socket.inet_ntop(socket.AF_INET6, bytes(data[start : start + 16]))
        port, _ = _PORTS.unpack_from(data, start + 32)
        return host, port
    return None


def _tlv_problem(data: bytes | bytearray, start: int, end: int) -> str | None:
    """TLVs are skipped, but their framing must fill the header exactly."""
    position = start
    while position < end:
        if position + _TLV_HEADER > end:
            return "v2: truncated TLV header"
        position += _TLV_HEADER + int.from_bytes(data[position + 1 : position + 3], "big")
        if position > end:
            return "v2: TLV longer than the header"
    return None
