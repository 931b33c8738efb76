"""recvmmsg(2) and sendmmsg(2), which Python's socket module lacks, through ctypes.

A busy UDP socket holds many datagrams at once. Reading them one ``recvfrom_into``
at a time costs a system call and a Python call per datagram, each building an
address tuple and a host string; the reply's ``sendto`` parses that string back.
One ``recvmmsg`` reads up to ``DatagramBatch.SIZE`` datagrams into fixed slots,
their sources stay raw ``sockaddr`` bytes, and one ``sendmmsg`` sends the replies
from the same slots: the per-datagram Python work left is the checks.

Slot ``i`` of the receive vector and slot ``i`` of the reply vector share the
datagram's buffer, source address and control messages; a reply is sent from
its own slot, so nothing is copied or re-pointed. Every slot has room for the
largest datagram, so nothing is ever truncated; the slots live in an anonymous
mapping, and pages the kernel never writes (the tail of each slot, for small
datagrams) are never allocated.

With ``pktinfo`` the kernel reports each datagram's destination (IP_PKTINFO /
IPV6_PKTINFO, enabled on the socket by the caller), and each reply names it as
its source: a wildcard socket then answers from the address it was asked on.

Linux-only (glibc and musl have both calls since 2.6.33). ``load()`` returns None
where ctypes or the calls are missing; the caller then reads one at a time.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

MSG_DONTWAIT = socket.MSG_DONTWAIT
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python 3.11 lacks the Linux constant
_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint))


_MMSG_SIZE = ctypes.sizeof(_MMsgHdr)
_MMSG_WORDS = _MMSG_SIZE // 8
_LEN = _MMsgHdr.msg_len.offset
_CONTROLLEN = _MsgHdr.msg_controllen.offset
# each datagram's received length (and the length of its control messages), read
# for a whole batch at once
_LENGTHS = struct.Struct(f"{_LEN}xI{_MMSG_SIZE - _LEN - 4}x")
_CONTROL_LENGTHS = struct.Struct(f"{_CONTROLLEN}xQ{_MMSG_SIZE - _CONTROLLEN - 8}x")
_CONTROLLEN_WORD = _CONTROLLEN // 8
# struct cmsghdr {size_t len; int level; int type;} then the data, in 32-bit words
_CMSG_LEVEL, _CMSG_TYPE, _CMSG_DATA = 2, 3, 4


@dataclass(frozen=True)
class _Calls:
    recvmmsg: Callable[..., int]
    sendmmsg: Callable[..., int]


def load() -> _Calls | None:
    """libc's recvmmsg and sendmmsg, or None where they cannot be called."""
    try:
        # PyDLL keeps the GIL: both calls are made with MSG_DONTWAIT and never block,
        # and a single-threaded worker gains nothing from releasing it twice a batch
        libc = ctypes.PyDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    fd, vector, count, flags = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
    recvmmsg.argtypes = (fd, vector, count, flags, ctypes.c_void_p)  # timeout: NULL
    sendmmsg.argtypes = (fd, vector, count, flags)
    recvmmsg.restype = sendmmsg.restype = ctypes.c_int
    return _Calls(recvmmsg, sendmmsg)


class DatagramBatch:
    """SIZE slots, each a datagram buffer, a source address and (with pktinfo)
    room for the control messages, with the two vectors the kernel reads:
    ``received`` for recvmmsg and ``replies`` for sendmmsg."""

    SIZE = 64

    def __init__(self, calls: _Calls, slot_size: int, family: int, pktinfo: bool) -> None:
        self.calls = calls
        ipv6 = family == socket.AF_INET6
        self.name_size = 28 if ipv6 else 16  # sockaddr_in6 / sockaddr_in
        count = self.SIZE
        # one control message: in6_pktinfo {addr, ifindex} or in_pktinfo {ifindex,
        # spec_dst, addr}; anything else reported is not answered with a source
        self.control_size = socket.CMSG_SPACE(20 if ipv6 else 12) if pktinfo else 0
        self.pktinfo = (
            (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO) if ipv6 else (socket.IPPROTO_IP, IP_PKTINFO)
        )
        self.ipv6 = ipv6
        # anonymous and lazily backed: see the module docstring
        self.memory = mmap.mmap(-1, count * slot_size)
        self.names = bytearray(count * self.name_size)
        self.names_view = memoryview(self.names)
        self.control = bytearray(count * self.control_size)
        self.control_words = memoryview(self.control).cast("I")
        self._receive_iov = (_IoVec * count)()
        self._reply_iov = (_IoVec * count)()
        self._received = (_MMsgHdr * count)()
        self._replies = (_MMsgHdr * count)()
        base = _address(self.memory)
        for index in range(count):
            slot = base + index * slot_size
            self._receive_iov[index].iov_base = self._reply_iov[index].iov_base = slot
            self._receive_iov[index].iov_len = slot_size
        for vector, iov in ((self._received, self._receive_iov), (self._replies, self._reply_iov)):
            for index in range(count):
                header = vector[index].msg_hdr
                header.msg_name = _address(self.names) + index * self.name_size
                header.msg_namelen = self.name_size
                header.msg_iov = ctypes.addressof(iov[index])
                header.msg_iovlen = 1
                if pktinfo:
                    header.msg_control = _address(self.control) + index * self.control_size
        for index in range(count):
            self._received[index].msg_hdr.msg_controllen = self.control_size
        self._received_bytes = memoryview(self._received).cast("B")  # type: ignore[arg-type]
        # the kernel writes each received msg_controllen (and msg_namelen, msg_len):
        # put the vector back as it was, in one copy, after a batch with pktinfo
        self._received_pristine = bytes(self._received_bytes)
        self._received_address = ctypes.addressof(self._received)
        self._replies_address = ctypes.addressof(self._replies)
        self._replies_words = memoryview(self._replies).cast("B").cast("Q")  # type: ignore[arg-type]
        # the reply lengths, written per datagram: iov_len is every other size_t
        self.reply_lengths = memoryview(self._reply_iov).cast("B").cast("Q")  # type: ignore[arg-type]

    def receive(self, fd: int) -> int:
        """Read up to SIZE waiting datagrams; their count (0: none waiting).
        OSError for anything but "none waiting"."""
        # msg_namelen comes back as name_size (the socket's family), msg_controllen
        # is put back by reply_from_destination: the vector needs nothing more
        count = self.calls.recvmmsg(fd, self._received_address, self.SIZE, MSG_DONTWAIT, None)
        if count < 0:
            code = ctypes.get_errno()
            if code in _AGAIN:
                return 0
            raise OSError(code, "recvmmsg")
        return count

    def lengths(self, count: int) -> list[int]:
        """The sizes of the first ``count`` datagrams received."""
        received = self._received_bytes[: count * _MMSG_SIZE]
        return [length for (length,) in _LENGTHS.iter_unpack(received)]

    def reply_from_destination(self, count: int) -> None:
        """With pktinfo: have each of the first ``count`` replies sent from the
        address its datagram was sent to, then make the vector ready again."""
        words, control, size = self.control_words, self.control, self.control_size // 4
        level, kind = self.pktinfo
        received = self._received_bytes[: count * _MMSG_SIZE]
        replies = self._replies_words
        for slot, (length,) in enumerate(_CONTROL_LENGTHS.iter_unpack(received)):
            at = slot * size
            if length != self.control_size or words[at + _CMSG_LEVEL] != level:
                length = 0  # no pktinfo (or more than it): the kernel picks the source
            elif words[at + _CMSG_TYPE] != kind:
                length = 0
            elif self.ipv6:
                # in6_pktinfo: keep the interface only for a link-local address (fe80::/10)
                address = 4 * (at + _CMSG_DATA)
                if not (control[address] == 0xFE and control[address + 1] & 0xC0 == 0x80):
                    words[at + _CMSG_DATA + 4] = 0
            else:
                # in_pktinfo: spec_dst names the source; ifindex 0 lets routing choose
                # the way back, and addr is not read on send
                words[at + _CMSG_DATA] = words[at + _CMSG_DATA + 2] = 0
            replies[slot * _MMSG_WORDS + _CONTROLLEN_WORD] = length
        self._received_bytes[: count * _MMSG_SIZE] = self._received_pristine[: count * _MMSG_SIZE]

    def send(self, fd: int, start: int, end: int) -> list[int]:
        """Send the replies of slots start..end-1 (their lengths set in
        ``reply_lengths``). Returns the slots whose reply the kernel refused
        (usually none): each is skipped, as a failed ``sendto`` would be."""
        refused: list[int] = []
        while start < end:
            done = self.calls.sendmmsg(
                fd, self._replies_address + start * _MMSG_SIZE, end - start, 0
            )
            if done < 0:  # the first of the rest was refused: skip it
                refused.append(start)
                done = 1
            start += done
        return refused


def _address(buffer: mmap.mmap | bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
