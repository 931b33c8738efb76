"""recvmmsg(2) and sendmmsg(2), which Python's socket module lacks, through ctypes.

A busy UDP socket holds many datagrams at once. Reading them one ``recvfrom_into``
at a time costs a system call and a Python call per datagram, each building an
address tuple and a host string; the reply's ``sendto`` parses that string back.
One ``recvmmsg`` reads up to ``DatagramBatch.SIZE`` datagrams into fixed slots,
their sources stay raw ``sockaddr`` bytes, and one ``sendmmsg`` sends the replies
from the same slots: the per-datagram Python work left is the checks.

Every slot has room for the largest datagram, so nothing is ever truncated. The
slots live in an anonymous mapping: pages the kernel never writes (the tail of
each slot, for small datagrams) are never allocated.

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
_MSG_LEN_OFFSET = _MMsgHdr.msg_len.offset
# the received length of each datagram, read for a whole batch at once
_MSG_LENGTHS = struct.Struct(f"{_MSG_LEN_OFFSET}xI{_MMSG_SIZE - _MSG_LEN_OFFSET - 4}x")


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
    """SIZE slots, each a datagram buffer and a source address, with the two
    vectors the kernel reads: ``received`` (every slot, full size) for recvmmsg
    and ``replies`` (the slots to answer, each its datagram's length) for sendmmsg.
    """

    SIZE = 64

    def __init__(self, calls: _Calls, slot_size: int, family: int) -> None:
        self.calls = calls
        self.slot_size = slot_size
        self.name_size = 16 if family == socket.AF_INET else 28  # sockaddr_in / _in6
        count = self.SIZE
        # anonymous and lazily backed: see the module docstring
        self.memory = mmap.mmap(-1, count * slot_size)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.names = bytearray(count * self.name_size)
        self.names_view = memoryview(self.names)
        names_base = ctypes.addressof(ctypes.c_char.from_buffer(self.names))
        self._receive_iov = (_IoVec * count)()
        self._reply_iov = (_IoVec * count)()
        self._received = (_MMsgHdr * count)()
        self._replies = (_MMsgHdr * count)()
        for index in range(count):
            slot = base + index * slot_size
            self._receive_iov[index].iov_base = self._reply_iov[index].iov_base = slot
            self._receive_iov[index].iov_len = slot_size
        self.name_addresses = [names_base + index * self.name_size for index in range(count)]
        for vector, iov in ((self._received, self._receive_iov), (self._replies, self._reply_iov)):
            for index in range(count):
                header = vector[index].msg_hdr
                header.msg_name = self.name_addresses[index]
                header.msg_namelen = self.name_size
                header.msg_iov = ctypes.addressof(iov[index])
                header.msg_iovlen = 1
        self._received_bytes = memoryview(self._received).cast("B")  # type: ignore[arg-type]
        # the reply lengths, written per datagram: iov_len is every other size_t
        self.reply_lengths = memoryview(self._reply_iov).cast("B").cast("Q")  # type: ignore[arg-type]
        self._received_address = ctypes.addressof(self._received)
        self._replies_address = ctypes.addressof(self._replies)
        self._replies_words = memoryview(self._replies).cast("B").cast("Q")  # type: ignore[arg-type]

    def receive(self, fd: int) -> int:
        """Read up to SIZE waiting datagrams; their count (0: none waiting).
        OSError for anything but "none waiting"."""
        # the kernel rewrites msg_namelen with each source's length: always
        # name_size for the socket's family, so the vector needs no reset
        count = self.calls.recvmmsg(fd, self._received_address, self.SIZE, MSG_DONTWAIT, None)
        if count < 0:
            code = ctypes.get_errno()
            if code in _AGAIN:
                return 0
            raise OSError(code, "recvmmsg")
        return count

    def lengths(self, count: int) -> list[int]:
        """The sizes of the first ``count`` datagrams received."""
        return [
            length
            for (length,) in _MSG_LENGTHS.iter_unpack(self._received_bytes[: count * _MMSG_SIZE])
        ]

    def send(self, fd: int, slots: list[int] | None, count: int) -> list[int]:
        """Send the replies: slots 0..count-1 when ``slots`` is None, else those
        slots in that order. Returns the slots whose reply the kernel refused
        (usually none): each is skipped, as a failed ``sendto`` would be."""
        if slots is not None:
            self._point_replies_at(slots)
            count = len(slots)
        refused: list[int] = []
        start = 0
        try:
            while start < count:
                done = self.calls.sendmmsg(
                    fd, self._replies_address + start * _MMSG_SIZE, count - start, 0
                )
                if done < 0:  # the first of the rest was refused: skip it
                    refused.append(start if slots is None else slots[start])
                    done = 1
                start += done
        finally:
            if slots is not None:
                self._point_replies_at(range(count))
        return refused

    def _point_replies_at(self, slots: list[int] | range) -> None:
        words = _MMSG_SIZE // 8
        iov_size = ctypes.sizeof(_IoVec)
        reply_iov = ctypes.addressof(self._reply_iov)
        for position, slot in enumerate(slots):
            self._replies_words[position * words] = self.name_addresses[slot]  # msg_name
            self._replies_words[position * words + 2] = reply_iov + slot * iov_size  # msg_iov
