"""The PROXY protocol parser (echod.server.proxy): every field of both versions,
every way the bytes can be split, and bytes that are not a header."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from echod.server.proxy import (
    MAX_HEADER,
    NEED_MORE,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Done,
    Malformed,
    ParseResult,
    ProxyHeaderParser,
    parse,
)

Outcome = tuple[str, object]  # ("done", (length, client)) / ("malformed", reason) / ("more", None)


def v2(
    command: int = 0x1,
    family: int = 0x11,
    body: bytes = b"",
    length: int | None = None,
    version: int = 0x2,
) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


def v2_inet(
    src: str, sport: int, dst: str = "127.0.0.1", dport: int = 7, tlvs: bytes = b""
) -> bytes:
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(family=0x11, body=addresses + tlvs)


def v2_inet6(src: str, sport: int, dst: str = "::1", dport: int = 7, tlvs: bytes = b"") -> bytes:
    addresses = (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sport, dport)
    )
    return v2(family=0x21, body=addresses + tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def outcome(result: ParseResult) -> Outcome:
    if isinstance(result, Done):
        return "done", (result.length, result.client)
    if isinstance(result, Malformed):
        return "malformed", result.reason
    return "more", None


def fed(pieces: list[bytes]) -> Outcome:
    """Feed the pieces in turn until the parser decides; check where it says the
    data begins agrees with the header's length."""
    parser = ProxyHeaderParser()
    offset = 0
    for piece in pieces:
        result = parser.feed(piece)
        if isinstance(result, Done):
            assert offset + result.data_start == result.length
            assert 0 <= result.data_start <= len(piece)
        if result is not NEED_MORE:
            return outcome(result)
        offset += len(piece)
    return "more", None


def assert_split_invariant(data: bytes) -> Outcome:
    whole = outcome(parse(data))
    assert fed([data]) == whole
    assert fed([data[i : i + 1] for i in range(len(data))]) == whole
    for cut in range(len(data) + 1):
        assert fed([data[:cut], data[cut:]]) == whole, cut
    return whole


# -- version 1 -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, client",
    [
        (b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 7\r\n", ("192.0.2.7", 5555)),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0)),
        (b"PROXY TCP6 2001:DB8::7 ::1 65535 7\r\n", ("2001:db8::7", 65535)),
        (b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 7\r\n", ("::ffff:192.0.2.7", 1)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN anything at all, ignored\r\n", None),
    ],
)
def test_v1_lines(line: bytes, client: tuple[str, int] | None) -> None:
    data = line + b"then echo data \r\n PROXY"
    assert assert_split_invariant(data) == ("done", (len(line), client))


def test_v1_longest_lines_are_accepted_and_one_byte_more_is_not() -> None:
    full6 = ":".join(["ffff"] * 8).encode()
    tcp6 = b"PROXY TCP6 " + full6 + b" " + full6 + b" 65535 65535\r\n"
    assert len(tcp6) == 104
    assert outcome(parse(tcp6)) == ("done", (104, (":".join(["ffff"] * 8), 65535)))
    worst = b"PROXY UNKNOWN " + full6 + b" " + full6 + b" 65535 65535\r\n"
    assert len(worst) == V1_MAX_LENGTH
    assert assert_split_invariant(worst + b"x") == ("done", (V1_MAX_LENGTH, None))
    too_long = b"PROXY UNKNOWN " + full6 + b" " + full6 + b" 65535 655355\r\n"
    assert assert_split_invariant(too_long) == ("malformed", "v1: no CRLF within 107 bytes")
    # decided at the 107th byte, without waiting for a CRLF that may never come
    assert outcome(parse(too_long[:V1_MAX_LENGTH])) == (
        "malformed",
        "v1: no CRLF within 107 bytes",
    )
    assert parse(too_long[: V1_MAX_LENGTH - 1]) is NEED_MORE


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 7\n", "v1: line ends in LF without CR"),
        (b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 7\rX\n", "v1: CR not followed by LF"),
        (b"PROXY UNKNOWN\n", "v1: line ends in LF without CR"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "v1: unknown protocol"),
        (b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n", "v1: unknown protocol"),
        (b"PROXY TCP4\r\n", "v1: unknown protocol"),
        (b"PROXY UNKNOWNX\r\n", "v1: unknown protocol"),
        (b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "v1: unknown protocol"),
        (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "one space apart"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "one space apart"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "one space apart"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", "one space apart"),
        (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "v1: bad TCP4 address"),
        (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "v1: bad TCP4 address"),
        (b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", "v1: bad TCP4 address"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "v1: bad TCP4 address"),
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "v1: bad TCP4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1: bad TCP6 address"),
        (b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "v1: bad TCP6 address"),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "v1: bad TCP6 address"),
        (b"PROXY TCP4 1.2.3.\xff 1.2.3.4 1 2\r\n", "v1: bad TCP4 address"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "v1: bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "v1: bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "v1: bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "v1: bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1a 2\r\n", "v1: bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n", "v1: bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 000001 2\r\n", "v1: bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 \xd9\xa1 2\r\n", "v1: bad port"),  # Arabic-Indic 1
    ],
)
def test_bad_v1_lines(data: bytes, reason: str) -> None:
    result = assert_split_invariant(data + b"more data")
    assert result[0] == "malformed"
    assert reason in str(result[1])


def test_v1_is_refused_as_soon_as_the_bytes_tell() -> None:
    assert outcome(parse(b"PROXY TCP5"))[0] == "malformed"  # at the 10th byte
    assert outcome(parse(b"PROXY U\n"))[0] == "malformed"
    assert outcome(parse(b"PROXY TCP4 1.2.3.4\rx"))[0] == "malformed"
    # the CR may still be followed by its LF
    assert parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r") is NEED_MORE


# -- signatures ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"hello",
        b"\x00",
        b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXX",
        b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"\r\n\r\n\x01",
        b"\r\n\r\n\x00\r\nQUIT\r",
        b"\r\nhello",
    ],
)
def test_anything_else_is_refused_at_the_first_wrong_byte(data: bytes) -> None:
    assert assert_split_invariant(data) == ("malformed", "not a PROXY protocol signature")
    first_wrong = next(i for i in range(1, len(data) + 1) if isinstance(parse(data[:i]), Malformed))
    for prefix in range(first_wrong):
        assert parse(data[:prefix]) is NEED_MORE
    assert first_wrong <= 12  # never later than the end of a signature


def test_a_first_byte_that_starts_no_signature_is_refused_alone() -> None:
    for byte in range(256):
        result = parse(bytes([byte]))
        if byte in b"P\r":
            assert result is NEED_MORE
        else:
            assert isinstance(result, Malformed)


# -- version 2 -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "header, client",
    [
        (v2_inet("192.0.2.7", 5555), ("192.0.2.7", 5555)),
        (v2_inet("0.0.0.0", 0, "255.255.255.255", 65535), ("0.0.0.0", 0)),
        (v2_inet6("2001:db8::7", 65535), ("2001:db8::7", 65535)),
        (v2_inet6("::ffff:192.0.2.7", 80), ("::ffff:192.0.2.7", 80)),
        (v2(command=0x0, family=0x00), None),  # LOCAL: the balancer's health check
        (v2(command=0x0, family=0x11, body=bytes(12)), None),  # LOCAL with addresses: ignored
        (v2(command=0x0, family=0xFF, body=b"\xff" * 40), None),  # LOCAL: the family is ignored
        (v2(command=0x1, family=0x00, body=b"whatever"), None),  # unspecified: keep the peer
        (v2(command=0x1, family=0x10, body=b"x"), None),  # IPv4, unspecified protocol
        (v2(command=0x1, family=0x31, body=b"/a".ljust(108, b"\0") * 2), None),  # AF_UNIX
        (v2(command=0x1, family=0x32, body=bytes(216)), None),  # AF_UNIX datagram
        (v2(command=0x1, family=0x12, body=bytes(12)), None),  # UDP: not this connection
        (v2(command=0x1, family=0x22, body=bytes(36)), None),
    ],
)
def test_v2_headers(header: bytes, client: tuple[str, int] | None) -> None:
    data = header + b"PROXY TCP4 echoed as data\r\n" + V2_SIGNATURE
    assert assert_split_invariant(data) == ("done", (len(header), client))


def test_v2_tlvs_are_skipped() -> None:
    tlvs = (
        tlv(0x01, b"h2")  # ALPN
        + tlv(0x02, b"echo.example")  # authority
        + tlv(0x04, b"")  # NOOP
        + tlv(0x05, b"u" * 128)  # unique ID
        + tlv(0x20, b"\x07" + bytes(4) + tlv(0x21, b"TLSv1.3") + tlv(0x28, b"\x30" * 1500))
        + tlv(0xEE, b"\0\r\n")  # unknown to anyone
    )
    header = v2_inet("192.0.2.7", 5555, tlvs=tlvs)
    assert assert_split_invariant(header + b"data") == ("done", (len(header), ("192.0.2.7", 5555)))
    header6 = v2_inet6("2001:db8::7", 1, tlvs=tlvs)
    assert outcome(parse(header6)) == ("done", (len(header6), ("2001:db8::7", 1)))


@pytest.mark.parametrize(
    "header, reason",
    [
        (v2(version=0x1), "v2: version 1, not 2"),
        (v2(version=0x3), "v2: version 3, not 2"),
        (v2(command=0x2), "v2: unknown command 0x2"),
        (v2(command=0xF), "v2: unknown command 0xf"),
        (v2(family=0x41, body=bytes(12)), "v2: unknown family/protocol 0x41"),
        (v2(family=0x13, body=bytes(12)), "v2: unknown family/protocol 0x13"),
        (v2(family=0x11, body=bytes(11)), "v2: 11 address bytes, fewer than the family's 12"),
        (v2(family=0x21, body=bytes(12)), "v2: 12 address bytes, fewer than the family's 36"),
        (v2(family=0x31, body=bytes(36)), "v2: 36 address bytes, fewer than the family's 216"),
        (v2_inet("1.2.3.4", 1, tlvs=b"\x01\x00"), "v2: truncated TLV header"),
        (v2_inet("1.2.3.4", 1, tlvs=b"\x01"), "v2: truncated TLV header"),
        (v2_inet("1.2.3.4", 1, tlvs=b"\x01\x00\x05abcd"), "v2: TLV longer than the header"),
        (v2_inet("1.2.3.4", 1, tlvs=tlv(1, b"ok") + b"\x02\xff\xff"), "v2: TLV longer"),
    ],
)
def test_bad_v2_headers(header: bytes, reason: str) -> None:
    result = assert_split_invariant(header + b"data after")
    assert result[0] == "malformed"
    assert reason in str(result[1])


def test_v2_is_refused_as_soon_as_the_bytes_tell() -> None:
    assert isinstance(parse(v2(version=0x1)[:13]), Malformed)  # at the version byte
    assert isinstance(parse(v2(family=0x41)[:14]), Malformed)  # at the family byte
    # a length over the cap, at the length field: the rest is never waited for
    oversized = v2(body=b"", length=MAX_HEADER - 16 + 1)
    assert outcome(parse(oversized[:16])) == (
        "malformed",
        f"v2: header of {MAX_HEADER + 1} bytes, over the {MAX_HEADER} accepted",
    )
    assert isinstance(parse(v2(length=0xFFFF)[:16]), Malformed)
    assert parse(v2(length=0xFFFF)[:15]) is NEED_MORE


def test_v2_headers_up_to_the_cap_are_accepted() -> None:
    body = socket.inet_aton("192.0.2.7") * 2 + struct.pack("!HH", 1, 2)
    padding = MAX_HEADER - 16 - len(body) - 3
    header = v2(body=body + tlv(0x04, bytes(padding)))
    assert len(header) == MAX_HEADER
    assert assert_split_invariant(header + b"x")[0] == "done"


def test_an_incomplete_header_needs_more_at_every_length() -> None:
    for header in (
        b"PROXY TCP6 2001:db8::7 ::1 5555 7\r\n",
        v2_inet6("2001:db8::7", 5555, tlvs=tlv(5, b"id")),
        v2(command=0x0, body=bytes(20)),
    ):
        for length in range(len(header)):
            assert parse(header[:length]) is NEED_MORE, (header, length)


def test_a_header_at_the_cap_completed_by_a_large_chunk() -> None:
    body = socket.inet_aton("192.0.2.7") * 2 + struct.pack("!HH", 1, 2)
    header = v2(body=body + tlv(0x04, bytes(MAX_HEADER - 16 - len(body) - 3)))
    parser = ProxyHeaderParser()
    assert parser.feed(header[:100]) is NEED_MORE
    assert parser.feed(header[100:-1]) is NEED_MORE
    result = parser.feed(header[-1:] + b"echo data" * 100_000)  # the last byte, much more after
    assert isinstance(result, Done)
    assert (result.length, result.client, result.data_start) == (MAX_HEADER, ("192.0.2.7", 1), 1)


def test_feeding_a_decided_parser_is_an_error() -> None:
    parser = ProxyHeaderParser()
    assert isinstance(parser.feed(b"PROXY UNKNOWN\r\nx"), Done)
    with pytest.raises(ValueError):
        parser.feed(b"more")


# -- properties ------------------------------------------------------------------------------
addresses4 = st.ip_addresses(v=4).map(str)
addresses6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=40)).map(lambda kv: tlv(*kv)), max_size=4
).map(b"".join)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int] | None]:
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    if kind == "v1-4":
        src, dst, sport, dport = draw(addresses4), draw(addresses4), draw(ports), draw(ports)
        return f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode(), (src, sport)
    if kind == "v1-6":
        src, dst, sport, dport = draw(addresses6), draw(addresses6), draw(ports), draw(ports)
        canonical = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, src))
        return f"PROXY TCP6 {src} {dst} {sport} {dport}\r\n".encode(), (canonical, sport)
    if kind == "v1-unknown":
        rest = draw(st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b))
        return b"PROXY UNKNOWN " + rest + b"\r\n", None
    if kind == "v2-4":
        src, sport = draw(addresses4), draw(ports)
        return v2_inet(src, sport, draw(addresses4), draw(ports), draw(tlv_lists)), (src, sport)
    if kind == "v2-6":
        src, sport = draw(addresses6), draw(ports)
        canonical = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, src))
        header = v2_inet6(src, sport, draw(addresses6), draw(ports), draw(tlv_lists))
        return header, (canonical, sport)
    return v2(
        command=0x0, family=draw(st.integers(0, 255)), body=draw(st.binary(max_size=50))
    ), None


@given(headers(), st.binary(max_size=64), st.data())
def test_a_valid_header_gives_its_client_however_split(
    header_and_client: tuple[bytes, tuple[str, int] | None], after: bytes, data: st.DataObject
) -> None:
    header, client = header_and_client
    stream = header + after
    assert outcome(parse(stream)) == ("done", (len(header), client))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert fed(pieces) == ("done", (len(header), client))


signature_led = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.binary(max_size=120).map(lambda b: b"PROXY TCP4 " + b),
    st.binary(max_size=120).map(lambda b: b"PROXY UNKNOWN" + b),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300)).map(
        lambda t: (
            V2_SIGNATURE + bytes([0x20 | (t[0] & 1), t[1]]) + struct.pack("!H", len(t[2])) + t[2]
        )
    ),
)


@given(signature_led, st.data())
def test_any_bytes_any_split_same_answer_and_no_crash(stream: bytes, data: st.DataObject) -> None:
    whole = outcome(parse(stream))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert fed(pieces) == whole
    assert fed([stream[i : i + 1] for i in range(len(stream))]) == whole
    if whole[0] == "done":
        length = whole[1][0]  # type: ignore[index]
        assert outcome(parse(stream[:length])) == whole  # decided by the header alone
