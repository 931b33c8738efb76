"""Open TCP connections counted across workers: ``max_connections_per_ip`` and
``max_connections_total`` hold exactly, whichever worker accepts.

The master creates the table before it forks (a memfd mapped shared, inherited
by every worker). Counts are kept twice:

* per worker (a row of per-client counts and a per-worker total): the truth,
  each row written only by its worker;
* summed (per-client totals and the grand total): what ``acquire`` compares
  against the limits, so a check costs O(1), not O(workers).

Check-and-increment must be atomic or two workers accepting at the same
instant could both take the last place, so every update holds an ``fcntl``
byte-range lock on the memfd (about 2 µs uncontended; paid only when a limit
is configured). A POSIX record lock is released by the kernel when its owner
dies, so a worker killed inside the critical section cannot wedge the others.
When the master reaps a worker it clears that worker's row and recomputes the
sums that worker had a share in from the rows of the workers still alive,
which is exact even if the worker died half-way through an update (the row is
always bumped first). The cost is proportional to the clients the dead worker
served, so stopping a thousand workers stays cheap.

Clients are hashed into a table of ``ENTRIES`` places; a client lives within
``PROBES`` places of its home, and a place whose count dropped to zero is free
for the next client. If all ``PROBES`` places are busy (about ``ENTRIES``
distinct clients connected at once) the connection is refused rather than
admitted unchecked.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
from collections.abc import Iterable

from echod.scoreboard import MAX_SLOTS

ENTRIES = 16384  # a power of two
PROBES = 32
STRIDE = ENTRIES + PROBES  # places in use: a window never wraps around
KEY_SIZE = 16  # an IPv6 address; IPv4 as ::ffff:a.b.c.d

_GRAND_TOTAL_OFFSET = 0
_WORKER_TOTALS_OFFSET = 64
_KEYS_OFFSET = _WORKER_TOTALS_OFFSET + 4 * MAX_SLOTS
_CLIENT_TOTALS_OFFSET = _KEYS_OFFSET + KEY_SIZE * STRIDE
_ROWS_OFFSET = _CLIENT_TOTALS_OFFSET + 4 * STRIDE
TABLE_SIZE = _ROWS_OFFSET + 2 * STRIDE * MAX_SLOTS  # ~34 MB virtual, touched as used

# acquire() results besides a place number (>= 0)
COUNTED = -1  # counted in the totals only (no per-client limit configured)
REJECT_TOTAL = -2
REJECT_PER_IP = -3
REJECT_TABLE_FULL = -4

_V4_MAPPED = bytes(10) + b"\xff\xff"
_ZERO_ROW = bytes(2 * STRIDE)

assert ENTRIES & (ENTRIES - 1) == 0
assert _ROWS_OFFSET % 4 == 0


def client_key(host: str) -> bytes:
    """16 bytes naming a client address (textual, as accept() returns it)."""
    if ":" not in host:
        return _V4_MAPPED + socket.inet_aton(host)
    return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])


class ConnectionTable:
    def __init__(self, fd: int, buffer: mmap.mmap) -> None:
        self.fd = fd
        self.buffer = buffer
        view = memoryview(buffer)
        self._grand_total = view[_GRAND_TOTAL_OFFSET : _GRAND_TOTAL_OFFSET + 4].cast("I")
        self._worker_totals = view[_WORKER_TOTALS_OFFSET:_KEYS_OFFSET].cast("I")
        self._client_totals = view[_CLIENT_TOTALS_OFFSET:_ROWS_OFFSET].cast("I")
        self._rows = view[_ROWS_OFFSET:TABLE_SIZE].cast("H")

    @classmethod
    def create(cls) -> ConnectionTable:
        fd = os.memfd_create("echod-connections", os.MFD_CLOEXEC)
        os.ftruncate(fd, TABLE_SIZE)
        return cls(fd, mmap.mmap(fd, TABLE_SIZE, mmap.MAP_SHARED))

    # -- the lock ------------------------------------------------------------------------
    def _lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)

    def _unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    # -- workers ---------------------------------------------------------------------------
    def acquire(
        self, worker: int, key: bytes | None, per_client_limit: int, total_limit: int
    ) -> int:
        """Count one connection of `worker` from client `key` (None: no per-client limit).
        Returns its place (>= 0) or COUNTED, to hand back to release(); or REJECT_*."""
        self._lock()
        try:
            if total_limit and self._grand_total[0] >= total_limit:
                return REJECT_TOTAL
            place = COUNTED
            if key is not None:
                place = self._find_or_claim(key)
                if place < 0:
                    return REJECT_TABLE_FULL
                if self._client_totals[place] >= per_client_limit:
                    return REJECT_PER_IP
                self._rows[worker * STRIDE + place] += 1
                self._client_totals[place] += 1
            self._worker_totals[worker] += 1
            self._grand_total[0] += 1
            return place
        finally:
            self._unlock()

    def release(self, worker: int, place: int) -> None:
        """The connection acquire() counted has closed."""
        self._lock()
        try:
            if place >= 0:
                index = worker * STRIDE + place
                if self._rows[index]:
                    self._rows[index] -= 1
                if self._client_totals[place]:
                    self._client_totals[place] -= 1
            if self._worker_totals[worker]:
                self._worker_totals[worker] -= 1
            if self._grand_total[0]:
                self._grand_total[0] -= 1
        finally:
            self._unlock()

    def _find_or_claim(self, key: bytes) -> int:
        """The client's place, or a free one claimed for it, or -1 (no room). Locked."""
        home = hash(key) & (ENTRIES - 1)
        start = _KEYS_OFFSET + home * KEY_SIZE
        end = start + PROBES * KEY_SIZE
        found = self.buffer.find(key, start, end)
        while found >= 0 and (found - _KEYS_OFFSET) % KEY_SIZE:
            found = self.buffer.find(key, found + 1, end)  # straddles two keys: keep looking
        if found >= 0:
            return (found - _KEYS_OFFSET) // KEY_SIZE
        try:
            place = home + self._client_totals[home : home + PROBES].tolist().index(0)
        except ValueError:
            return -1
        offset = _KEYS_OFFSET + place * KEY_SIZE
        self.buffer[offset : offset + KEY_SIZE] = key
        return place

    # -- the master ------------------------------------------------------------------------
    def forget_worker(self, worker: int, alive: Iterable[int]) -> None:
        """A worker is gone (reaped): drop its counts and recompute, from the rows of
        the workers still alive, every sum it had a share in."""
        alive = sorted(set(alive) - {worker})
        start = _ROWS_OFFSET + 2 * STRIDE * worker
        self._lock()
        try:
            row = self._rows[worker * STRIDE : (worker + 1) * STRIDE]
            # acquire() bumps the row before the sum, so a worker that died half-way
            # has a non-zero place in its row wherever a sum may be off
            if self.buffer[start : start + 2 * STRIDE] != _ZERO_ROW:
                places = [place for place, count in enumerate(row.tolist()) if count]
                self.buffer[start : start + 2 * STRIDE] = _ZERO_ROW
                for place in places:
                    self._client_totals[place] = sum(
                        self._rows[other * STRIDE + place] for other in alive
                    )
            self._worker_totals[worker] = 0
            self._grand_total[0] = sum(self._worker_totals[other] for other in alive)
        finally:
            self._unlock()
