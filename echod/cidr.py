"""Client address lists (``allow`` / ``deny``): parsing at config load, matching per client.

Matching must be cheap because it runs on every accepted connection (and every
datagram) when a list is configured. A :class:`NetworkSet` keeps, per address
family, one set of network numbers per distinct prefix length, so a lookup
costs one shift and one set probe per prefix length in use, not one comparison
per listed network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

IPV4_BITS = 32
IPV6_BITS = 128
_V4_MAPPED = 0xFFFF << 32  # ::ffff:0:0/96: how an IPv4 client looks on a dual-stack socket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """``ADDR`` or ``ADDR/PREFIX`` (IPv4 or IPv6); ValueError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text!r} is not an address or network")
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an address or network ({exc})") from None
        # 10.1.2.3/8 is almost always a typo for 10.0.0.0/8 or 10.1.2.3/32: say so
        raise ValueError(f"{text!r} has host bits set (did you mean {loose}?)") from None


def networks_problem(values: Iterable[str]) -> str | None:
    """Config checker for a list of networks: the first bad entry, or None."""
    for text in values:
        try:
            parse_network(text)
        except ValueError as exc:
            return str(exc)
    return None


def host_to_int(host: str) -> tuple[int, int]:
    """(bits, value) for a textual address from accept()/recvfrom(); IPv4-mapped
    IPv6 addresses count as IPv4. ValueError for anything that is not an address."""
    if ":" not in host:
        return IPV4_BITS, int.from_bytes(socket.inet_aton(host), "big")
    if "%" in host:
        host = host.partition("%")[0]  # link-local scope: not part of the address
    value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host), "big")
    if value >> 32 == 0xFFFF:  # an IPv4 client of a dual-stack socket
        return IPV4_BITS, value & 0xFFFFFFFF
    return IPV6_BITS, value


class NetworkSet:
    """A set of IPv4/IPv6 networks answering "does it contain this address?".

    An IPv4 client, whether it arrived as ``1.2.3.4`` or as ``::ffff:1.2.3.4``
    (a dual-stack socket), matches an IPv4 network holding ``1.2.3.4`` and an
    IPv6 network holding ``::ffff:1.2.3.4`` (``deny = ["::ffff:0:0/96"]`` denies
    every IPv4 client).
    """

    def __init__(self, networks: Iterable[Network | str]) -> None:
        by_family: dict[int, dict[int, set[int]]] = {IPV4_BITS: {}, IPV6_BITS: {}}
        count = 0
        for item in networks:
            network = parse_network(item) if isinstance(item, str) else item
            bits = network.max_prefixlen
            shift = bits - network.prefixlen
            by_family[bits].setdefault(shift, set()).add(int(network.network_address) >> shift)
            count += 1
        self._count = count
        self._tables: dict[int, tuple[tuple[int, frozenset[int]], ...]] = {
            bits: tuple((shift, frozenset(members)) for shift, members in sorted(table.items()))
            for bits, table in by_family.items()
        }

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def contains_int(self, bits: int, value: int) -> bool:
        for shift, members in self._tables[bits]:  # a loop, not any(): no generator per client
            if value >> shift in members:
                return True
        # An IPv4 client is the same client whichever socket it came through, so
        # it also matches IPv6 networks holding its mapped form (::ffff:0:0/96).
        if bits == IPV4_BITS and self._tables[IPV6_BITS]:
            mapped = _V4_MAPPED | value
            for shift, members in self._tables[IPV6_BITS]:
                if mapped >> shift in members:
                    return True
        return False

    def __contains__(self, host: str) -> bool:
        try:
            bits, value = host_to_int(host)
        except (OSError, ValueError):
            return False
        return self.contains_int(bits, value)


class AddressPolicy:
    """``allow`` / ``deny``: deny wins; an empty allow list allows everyone."""

    def __init__(self, allow: Iterable[Network | str], deny: Iterable[Network | str]) -> None:
        self.allow = NetworkSet(allow)
        self.deny = NetworkSet(deny)

    def __bool__(self) -> bool:
        """False when the policy admits everybody (nothing to check)."""
        return bool(self.allow) or bool(self.deny)

    def permits(self, host: str) -> bool:
        try:
            bits, value = host_to_int(host)
        except (OSError, ValueError):
            return not self.allow  # not an IP address: cannot be on any list
        if self.deny and self.deny.contains_int(bits, value):
            return False
        return not self.allow or self.allow.contains_int(bits, value)
