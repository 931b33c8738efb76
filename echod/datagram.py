"""How large a UDP datagram can be, for the server (echod.server.udp) and the
probe (echod.ctl.probe) alike."""

from typing import Final

# The largest UDP payloads: IPv4 65535 - 20 (IP header) - 8 (UDP header); IPv6
# 65535 (payload length, header excluded) - 8. Anything larger would be an IPv6
# jumbogram, which needs a 4 GB-MTU link: not supported.
MAX_UDP_PAYLOAD_IPV4: Final = 65507
MAX_UDP_PAYLOAD_IPV6: Final = 65527
