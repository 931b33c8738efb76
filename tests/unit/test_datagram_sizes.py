"""One definition of the largest UDP payload, for the server and the probe."""

from echod.ctl import probe
from echod.datagram import MAX_UDP_PAYLOAD_IPV4, MAX_UDP_PAYLOAD_IPV6
from echod.server import udp


def test_the_server_reads_every_datagram_whole() -> None:
    assert max(MAX_UDP_PAYLOAD_IPV4, MAX_UDP_PAYLOAD_IPV6) < udp.BUFFER_SIZE


def test_the_probe_sends_nothing_larger_than_ipv4_carries() -> None:
    assert probe.MAX_UDP_DATAGRAM == MAX_UDP_PAYLOAD_IPV4
