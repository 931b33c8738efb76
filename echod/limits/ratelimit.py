"""Token buckets in shared memory: the UDP rate limits, enforced across all workers.

The master maps one shared region (a memfd) before it forks; every worker
inherits the same pages, so a source flooding several workers drains one
bucket, not one per worker.

Layout: a global bucket, then a set-associative table of per-source buckets.
A source's 64-bit key picks a set of ``WAYS`` entries; a source not in its set
takes the entry used least recently (an idle bucket refills to full anyway, so
evicting it loses nothing; evicting a busy one hands that source a fresh
bucket, which the global cap still bounds).

Concurrency. Without a lock, two workers updating one bucket can both start
from the same token count and one datagram goes uncharged; a worker preempted
between its read and its write even rolls back every update made meanwhile.
Measured with two workers on two busy cores, that let 40% more through than
configured, so it is not accepted. Instead each decision reads the buckets
without a lock first: a datagram over a limit (the bulk of any flood) is
dropped on that read alone, with no syscall and no write. Only a datagram
that looks admissible takes an ``fcntl`` lock (released by the kernel if its
holder dies), re-reads, and takes its tokens. So the lock, about 2 µs each way,
is paid once per answered datagram, never per dropped one, and the limits are
exact. A torn read outside the lock can at worst make one datagram take the
locked path for nothing.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import sys
from collections.abc import Callable

WAYS = 8
SETS = 8192  # 65536 sources tracked at once; a power of two
SET_SIZE = WAYS * 8 + WAYS * 16  # keys, then (tokens, last) pairs
HEADER_SIZE = 64  # the global bucket lives here
TABLE_SIZE = HEADER_SIZE + SETS * SET_SIZE
_KEY_MASK = (1 << 64) - 1

_KEYS = struct.Struct(f"<{WAYS}Q")
_PAIRS = struct.Struct(f"<{2 * WAYS}d")
_PAIR = struct.Struct("<dd")
_KEY = struct.Struct("<Q")
_GLOBAL_OFFSET = 0

# limiter() verdicts
ADMIT = 0
OVER_SOURCE_RATE = 1
OVER_TOTAL_RATE = 2

assert SETS & (SETS - 1) == 0


class SharedBuckets:
    """Per-source and global token buckets; create in the master, use in the workers."""

    def __init__(self, fd: int, buffer: mmap.mmap) -> None:
        self.fd = fd  # for the global bucket's lock
        self.buffer = buffer

    @classmethod
    def create(cls) -> SharedBuckets:
        # shared and inherited by fork(), invisible to anyone else
        fd = os.memfd_create("echod-udp-buckets", os.MFD_CLOEXEC)
        os.ftruncate(fd, TABLE_SIZE)
        return cls(fd, mmap.mmap(fd, TABLE_SIZE, mmap.MAP_SHARED))

    def limiter(
        self, rate: float, burst: float, total_rate: float, total_burst: float
    ) -> Callable[[int, float], int]:
        """admit(key, now) -> ADMIT, OVER_SOURCE_RATE or OVER_TOTAL_RATE, for a source
        `key` (any int: a hash of its address). A rate of 0 turns that limit off.
        Everything is bound locally: this runs for every datagram."""
        buffer, fd = self.buffer, self.fd
        unpack_keys, unpack_pairs = _KEYS.unpack_from, _PAIRS.unpack_from
        unpack_pair, pack_pair, pack_key = _PAIR.unpack_from, _PAIR.pack_into, _KEY.pack_into
        lockf, lock, unlock = fcntl.lockf, fcntl.LOCK_EX, fcntl.LOCK_UN
        key_mask, set_mask = _KEY_MASK, SETS - 1
        per_source, overall = rate > 0, total_rate > 0

        def source_offset(key: int, base: int) -> int:
            """Where the bucket of `key` is, or -1."""
            try:
                return base + WAYS * 8 + unpack_keys(buffer, base).index(key) * 16
            except ValueError:
                return -1

        def admit(key: int, now: float) -> int:
            key &= key_mask
            base = HEADER_SIZE + (key & set_mask) * SET_SIZE
            # 1. without the lock: is there a token at all? (a new source has its burst)
            if per_source:
                offset = source_offset(key, base)
                if (
                    offset >= 0
                    and _refilled(unpack_pair(buffer, offset), now, rate, burst)[0] < 1.0
                ):
                    return OVER_SOURCE_RATE
            if (
                overall
                and _refilled(unpack_pair(buffer, _GLOBAL_OFFSET), now, total_rate, total_burst)[0]
                < 1.0
            ):
                return OVER_TOTAL_RATE
            # 2. with the lock: take the tokens, all or none
            lockf(fd, lock, 1, 0)
            try:
                if per_source:
                    offset = source_offset(key, base)
                    if offset < 0:
                        # unknown (or forgotten) source: it takes the least recently used way
                        lasts = unpack_pairs(buffer, base + WAYS * 8)[1::2]
                        way = lasts.index(min(lasts))
                        pack_key(buffer, base + way * 8, key)
                        offset = base + WAYS * 8 + way * 16
                        pack_pair(buffer, offset, burst, now)  # not the evicted one's state
                        source_tokens, source_last = burst, now
                    else:
                        source_tokens, source_last = _refilled(
                            unpack_pair(buffer, offset), now, rate, burst
                        )
                    if source_tokens < 1.0:
                        return OVER_SOURCE_RATE
                if overall:
                    total_tokens, total_last = _refilled(
                        unpack_pair(buffer, _GLOBAL_OFFSET), now, total_rate, total_burst
                    )
                    if total_tokens < 1.0:
                        return OVER_TOTAL_RATE
                    pack_pair(buffer, _GLOBAL_OFFSET, total_tokens - 1.0, total_last)
                if per_source:
                    pack_pair(buffer, offset, source_tokens - 1.0, source_last)
                return ADMIT
            finally:
                lockf(fd, unlock, 1, 0)

        return admit


def _refilled(
    state: tuple[float, float], now: float, rate: float, burst: float
) -> tuple[float, float]:
    """(tokens, last) of a bucket brought up to `now`."""
    tokens, last = state
    elapsed = now - last
    if elapsed > 0.0:
        return min(burst, tokens + elapsed * rate), now
    if elapsed != elapsed or tokens != tokens:
        return burst, now  # NaN: a torn read outside the lock; harmless, start afresh
    # another worker's clock read a little later than ours: no refill, no going back
    return min(burst, tokens), last


# A source address's key for limiter(). hash() of a str is keyed per boot of the
# master (PYTHONHASHSEED) and identical in the workers it forks, so remote peers
# cannot aim their addresses at one set. The builtin itself rather than a wrapper,
# since it runs for every datagram; limiter() keeps the low 64 bits.
source_key: Callable[[str], int] = hash


if sys.hash_info.width < 64:  # pragma: no cover - echod targets 64-bit Linux
    raise ImportError("echod.ratelimit needs a 64-bit hash()")
