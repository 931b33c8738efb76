"""Parsing of listen addresses: ``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``,
``udp://HOST:PORT`` and ``fd://N``.

Parsing is pure (no DNS, no sockets) so it can validate a config anywhere;
``listeners`` turns an :class:`Address` into a socket.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the trailing NUL


class Transport(Enum):
    TCP = "tcp"
    UDP = "udp"
    UNIX = "unix"
    FD = "fd"


@dataclass(frozen=True, slots=True)
class Address:
    transport: Transport
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1

    @property
    def is_datagram(self) -> bool:
        return self.transport is Transport.UDP

    def __str__(self) -> str:
        match self.transport:
            case Transport.UNIX:
                return f"unix:{self.path}"
            case Transport.FD:
                return f"fd://{self.fd}"
            case Transport.UDP:
                return f"udp://{format_host_port(self.host, self.port)}"
            case _:
                return format_host_port(self.host, self.port)


def format_host_port(host: str, port: int) -> str:
    """HOST:PORT, with IPv6 addresses in brackets so the port stays unambiguous.

    The one spelling of an address that echod logs, echoctl prints and the
    socket-activation code matches against ``--bind``.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> Address:
    """Parse one bind address; raise ValueError with a message naming the problem."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]  # tolerate unix://PATH
        if not path:
            raise ValueError(f"{text!r}: unix socket path is empty")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"{text!r}: unix socket path longer than {UNIX_PATH_MAX} bytes")
        return Address(Transport.UNIX, path=path)
    if text.startswith("fd://"):
        number = text[len("fd://") :]
        if not number.isdigit():
            raise ValueError(f"{text!r}: expected fd://N with N a file descriptor number")
        return Address(Transport.FD, fd=int(number))
    transport = Transport.TCP
    rest = text
    for scheme, kind in (("udp://", Transport.UDP), ("tcp://", Transport.TCP)):
        if text.startswith(scheme):
            transport, rest = kind, text[len(scheme) :]
            break
    host, port = _split_host_port(text, rest)
    return Address(transport, host=host, port=port)


def _split_host_port(original: str, text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, tail = text[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise ValueError(f"{original!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{original!r}: {host!r} is not an IPv6 address") from None
        port_text = tail[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(
                f"{original!r}: expected HOST:PORT, [IPV6]:PORT, unix:PATH, "
                "udp://HOST:PORT or fd://N"
            )
        if ":" in host:
            raise ValueError(f"{original!r}: IPv6 addresses need brackets, as in [::1]:7007")
        if not host:
            raise ValueError(f"{original!r}: host is empty (use 0.0.0.0 or [::] for all)")
    if not port_text.isdigit():
        raise ValueError(f"{original!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{original!r}: port {port} is out of range 0-65535")
    return host, port
