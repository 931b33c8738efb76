"""PROXY protocol headers as a balancer sends them (HAProxy's send-proxy and
send-proxy-v2), for the tests that play the balancer."""

from __future__ import annotations

import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1_header(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 7) -> bytes:
    protocol = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode()


def v2_header(
    src: str, sport: int, dst: str | None = None, dport: int = 7, tlvs: bytes = b""
) -> bytes:
    """A v2 PROXY command, TCP over IPv4 or IPv6, with optional TLVs."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    dst = dst or ("::1" if family == socket.AF_INET6 else "127.0.0.1")
    body = (
        socket.inet_pton(family, src)
        + socket.inet_pton(family, dst)
        + struct.pack("!HH", sport, dport)
        + tlvs
    )
    family_byte = 0x21 if family == socket.AF_INET6 else 0x11
    return V2_SIGNATURE + bytes([0x21, family_byte]) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    """A v2 LOCAL command: the balancer's own health check, no addresses."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value
