"""allow / deny lists: parsing errors and matching, checked against the ipaddress module."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echod.cidr import AddressPolicy, NetworkSet, host_to_int, parse_network
from echod.config import load_config
from echod.errors import ConfigError


@pytest.mark.parametrize("key", ["allow", "deny"])
@pytest.mark.parametrize(
    "text, problem",
    [
        ("127.0.0.1/8", "host bits set (did you mean 127.0.0.0/8?)"),
        ("127.0.0.1/33", "is not an address or network"),
        ("localhost", "is not an address or network"),
        ("::1/129", "is not an address or network"),
        ("", "is not an address or network"),
    ],
)
def test_bad_networks_are_refused_naming_the_key(key: str, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, cli_overrides={key: ["127.0.0.0/8", text]})
    assert f"{key}: " in str(caught.value)
    assert problem in str(caught.value)


def test_plain_addresses_are_single_host_networks() -> None:
    assert parse_network("127.0.0.2") == ipaddress.ip_network("127.0.0.2/32")
    assert parse_network("::1") == ipaddress.ip_network("::1/128")


def test_deny_wins_and_empty_allow_allows_everyone() -> None:
    assert not AddressPolicy([], [])
    everyone_but = AddressPolicy([], ["127.0.0.2"])
    assert everyone_but.permits("127.0.0.1")
    assert not everyone_but.permits("127.0.0.2")
    only_loopback = AddressPolicy(["127.0.0.0/8", "::1"], ["127.0.0.2"])
    assert only_loopback.permits("127.0.0.1")
    assert only_loopback.permits("::1")
    assert not only_loopback.permits("127.0.0.2")
    assert not only_loopback.permits("::2")
    assert not only_loopback.permits("not an address")


def test_ipv4_mapped_and_scoped_addresses() -> None:
    assert host_to_int("::ffff:127.0.0.1") == host_to_int("127.0.0.1")
    assert "::ffff:127.0.0.2" in NetworkSet(["127.0.0.0/30"])
    assert "fe80::1%lo" in NetworkSet(["fe80::/10"])


ipv4 = st.integers(0, 2**32 - 1)
ipv6 = st.integers(0, 2**128 - 1)


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if draw(st.booleans()):
        return ipaddress.ip_network((draw(ipv4), draw(st.integers(0, 32))), strict=False)
    return ipaddress.ip_network((draw(ipv6), draw(st.integers(0, 128))), strict=False)


@st.composite
def addresses_near(draw: st.DrawFn, nets: list) -> str:
    """Addresses inside, at the edge of, or just outside the drawn networks, or random."""
    choice = draw(st.integers(0, 3))
    if nets and choice < 3:
        net = draw(st.sampled_from(nets))
        edge = [int(net.network_address), int(net.broadcast_address)][choice % 2]
        value = edge + draw(st.sampled_from([-1, 0, 1])) if choice < 2 else edge
        value %= 2**net.max_prefixlen
        return str(
            ipaddress.ip_address(value) if net.version == 6 else ipaddress.IPv4Address(value)
        )
    if draw(st.booleans()):
        return str(ipaddress.IPv4Address(draw(ipv4)))
    return str(ipaddress.IPv6Address(draw(ipv6)))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_matches_like_the_ipaddress_module(data: st.DataObject) -> None:
    nets = data.draw(st.lists(networks(), max_size=8))
    host = data.draw(addresses_near(nets))
    assert (host in NetworkSet(nets)) == oracle(host, nets)


def oracle(host: str, nets: list) -> bool:
    """The semantics by the ipaddress module: an IPv4 client, plain or mapped,
    matches IPv4 networks by its IPv4 form and IPv6 networks by its mapped form."""
    address = ipaddress.ip_address(host)
    v4 = address if address.version == 4 else address.ipv4_mapped
    forms = [address] if v4 is None else [v4, ipaddress.IPv6Address(f"::ffff:{v4}")]
    return any(form.version == net.version and form in net for form in forms for net in nets)


@pytest.mark.parametrize(
    ("nets", "host", "expected"),
    [
        # found by the property test: the mapped form lies inside ::/80
        (["0.0.0.0/1", "0.0.0.0/1", "::/80"], "::ffff:ffff:fffe", True),
        (["128.0.0.0/1"], "::ffff:ffff:fffe", True),
        (["::ffff:0:0/96"], "::ffff:10.1.2.3", True),
        (["::ffff:0:0/96"], "10.1.2.3", True),  # the same client on an IPv4 socket
        (["::ffff:10.0.0.0/104"], "10.1.2.3", True),
        (["::ffff:10.0.0.0/104"], "11.1.2.3", False),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),
        (["::/96"], "10.1.2.3", False),  # ::10.1.2.3 (IPv4-compatible) is not the mapped form
    ],
)
def test_ipv4_clients_match_both_forms(nets: list[str], host: str, expected: bool) -> None:
    networks = [ipaddress.ip_network(n) for n in nets]
    assert oracle(host, networks) == expected
    assert (host in NetworkSet(nets)) == expected
    assert AddressPolicy([], nets).permits(host) == (not expected)
