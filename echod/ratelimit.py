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
        buffer = self.buffer
        key &= _KEY_MASK
        base = HEADER_SIZE + (key & (SETS - 1)) * SET_SIZE
        try:
            way = _KEYS.unpack_from(buffer, base).index(key)
        except ValueError:
            # a source we do not know (or forgot): it starts with a full bucket
            pairs = _PAIRS.unpack_from(buffer, base + WAYS * 8)
            lasts = pairs[1::2]
            way = lasts.index(min(lasts))
            _KEY.pack_into(buffer, base + way * 8, key)
            _PAIR.pack_into(buffer, base + WAYS * 8 + way * 16, burst - 1.0, now)
            return True
        return _take(buffer, base + WAYS * 8 + way * 16, now, rate, burst)

    def admit_global(self, now: float, rate: float, burst: float) -> bool:
        return _take(self.buffer, _GLOBAL_OFFSET, now, rate, burst)


def _take(buffer: mmap.mmap, offset: int, now: float, rate: float, burst: float) -> bool:
    tokens, last = _PAIR.unpack_from(buffer, offset)
    elapsed = now - last
    if elapsed > 0.0:
        # min() also turns a NaN from a torn read into a full bucket rather than an error
        tokens = min(burst, tokens + elapsed * rate)
        last = now
    elif elapsed != elapsed:
        tokens, last = burst, now  # NaN: only a torn write makes one; start afresh
    elif tokens > burst:
        tokens = burst  # the limits shrank on reload
    if tokens < 1.0:
        return False  # nothing written: the next packet recomputes from the same `last`
    _PAIR.pack_into(buffer, offset, tokens - 1.0, last)
    return True


def source_key(host: str) -> int:
    """A 64-bit key for a source address. hash() of a str is keyed per boot of the
    master (PYTHONHASHSEED) and identical in the workers it forks, so remote peers
    cannot aim their addresses at one set."""
    return hash(host) & _KEY_MASK


if sys.hash_info.width < 64:  # pragma: no cover - echod targets 64-bit Linux
    raise ImportError("echod.ratelimit needs a 64-bit hash()")
