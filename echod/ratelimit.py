"""Token buckets in shared memory: the UDP rate limits, enforced across all workers.

The master maps one anonymous shared region before it forks; every worker
inherits the same pages, so a source flooding several workers drains one
bucket, not one per worker.

Layout: a global bucket, then a set-associative table of per-source buckets.
A source's 64-bit key picks a set of ``WAYS`` entries; a source not in its set
takes the entry used least recently (an idle bucket refills to full anyway, so
evicting it loses nothing; evicting a busy one hands that source a fresh
bucket, which the global cap still bounds).

Updates are lock-free read-compute-write sequences. The race accepted, by
design: two workers updating the same bucket at the same instant both start
from the same token count, so one of the two packets goes uncharged. That
admits at most one extra packet per colliding update (a few per second under
a flood spread over several workers), in exchange for no lock and no syscall
on the datagram path. A torn read (another worker wrote half an entry) can
make one decision on a neighbour's state; token counts are clamped so it
never goes further than that.
"""

from __future__ import annotations

import mmap
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

assert SETS & (SETS - 1) == 0


class SharedBuckets:
    """Per-source and global token buckets; create in the master, use in the workers."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer

    @classmethod
    def create(cls) -> SharedBuckets:
        # anonymous + MAP_SHARED: inherited by fork(), invisible to anyone else
        return cls(mmap.mmap(-1, TABLE_SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS))

    def admit_source(self, key: int, now: float, rate: float, burst: float) -> bool:
        """Take one token from the bucket of `key` (any int: a hash of the source)."""
        return self.source_limiter(rate, burst)(key, now)

    def admit_global(self, now: float, rate: float, burst: float) -> bool:
        return self.global_limiter(rate, burst)(now)

    def source_limiter(self, rate: float, burst: float) -> Callable[[int, float], bool]:
        """admit(key, now): the per-source check with everything it needs bound
        locally (it runs for every datagram)."""
        buffer = self.buffer
        unpack_keys, unpack_pairs = _KEYS.unpack_from, _PAIRS.unpack_from
        unpack_pair, pack_pair, pack_key = _PAIR.unpack_from, _PAIR.pack_into, _KEY.pack_into
        key_mask, set_mask = _KEY_MASK, SETS - 1

        def admit(key: int, now: float) -> bool:
            key &= key_mask
            base = HEADER_SIZE + (key & set_mask) * SET_SIZE
            try:
                offset = base + WAYS * 8 + unpack_keys(buffer, base).index(key) * 16
            except ValueError:
                # a source we do not know (or forgot): it starts with a full bucket
                lasts = unpack_pairs(buffer, base + WAYS * 8)[1::2]
                way = lasts.index(min(lasts))
                pack_key(buffer, base + way * 8, key)
                pack_pair(buffer, base + WAYS * 8 + way * 16, burst - 1.0, now)
                return True
            tokens, last = unpack_pair(buffer, offset)
            elapsed = now - last
            if elapsed > 0.0:
                # min() also turns a NaN from a torn read into a full bucket
                tokens = min(burst, tokens + elapsed * rate)
                last = now
            elif elapsed != elapsed:
                tokens, last = burst, now  # NaN: only a torn write makes one; start afresh
            elif tokens > burst:
                tokens = burst  # the limits shrank on reload
            if tokens < 1.0:
                return False  # nothing written: the next packet recomputes from `last`
            pack_pair(buffer, offset, tokens - 1.0, last)
            return True

        return admit

    def global_limiter(self, rate: float, burst: float) -> Callable[[float], bool]:
        """admit(now): one bucket for the whole server."""
        buffer = self.buffer
        unpack_pair, pack_pair = _PAIR.unpack_from, _PAIR.pack_into

        def admit(now: float) -> bool:
            tokens, last = unpack_pair(buffer, _GLOBAL_OFFSET)
            elapsed = now - last
            if elapsed > 0.0:
                tokens = min(burst, tokens + elapsed * rate)
                last = now
            elif elapsed != elapsed:
                tokens, last = burst, now
            elif tokens > burst:
                tokens = burst
            if tokens < 1.0:
                return False
            pack_pair(buffer, _GLOBAL_OFFSET, tokens - 1.0, last)
            return True

        return admit


def source_key(host: str) -> int:
    """A 64-bit key for a source address. hash() of a str is keyed per boot of the
    master (PYTHONHASHSEED) and identical in the workers it forks, so remote peers
    cannot aim their addresses at one set."""
    return hash(host) & _KEY_MASK


if sys.hash_info.width < 64:  # pragma: no cover - echod targets 64-bit Linux
    raise ImportError("echod.ratelimit needs a 64-bit hash()")
