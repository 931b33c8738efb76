"""Payloads echoctl sends, and how a wrong echo is described."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

DEFAULT_SEED = 862  # RFC 862: a fixed default makes runs reproducible
DEFAULT_MESSAGE = b"echoctl probe: the quick brown fox jumps over the lazy dog\n"

# first_difference compares blocks this long with C-speed slice equality and
# only walks byte by byte inside the block that differs.
_COMPARE_BLOCK = 4096


def seeded_bytes(size: int, seed: int = DEFAULT_SEED) -> bytes:
    """`size` pseudo-random bytes, the same for the same seed on every run and platform."""
    return random.Random(seed).randbytes(size)


def first_difference(expected: bytes | memoryview, got: bytes | memoryview) -> int | None:
    """Offset of the first byte where the two differ (including one being shorter), or None."""
    common = min(len(expected), len(got))
    for start in range(0, common, _COMPARE_BLOCK):
        stop = min(start + _COMPARE_BLOCK, common)
        if expected[start:stop] != got[start:stop]:
            for offset in range(start, stop):
                if expected[offset] != got[offset]:
                    return offset
    if len(expected) != len(got):
        return common
    return None


def describe_mismatch(
    expected: bytes | memoryview, got: bytes | memoryview, *, base_offset: int = 0
) -> str | None:
    """Why `got` is not an echo of `expected`, or None if it is.

    `base_offset` is added to reported offsets when `got` is a piece of a
    longer stream.
    """
    offset = first_difference(expected, got)
    if offset is None:
        return None
    where = base_offset + offset
    if offset < min(len(expected), len(got)):
        return (
            f"first difference at offset {where} "
            f"(sent 0x{expected[offset]:02x}, got 0x{got[offset]:02x})"
        )
    if len(got) > len(expected):
        return f"{len(got) - len(expected)} extra bytes after the {where} expected"
    return f"only {where} of {base_offset + len(expected)} bytes came back"


@dataclass
class CyclicPattern:
    """An endless byte stream that repeats a seeded block, sliceable at any offset.

    The block is stored once plus a copy of its first `max_chunk` bytes, so any
    piece of up to `max_chunk` bytes starting anywhere is one contiguous slice:
    producing and verifying a chunk costs one slice, no copying loops.
    """

    seed: int = DEFAULT_SEED
    # A prime period keeps the pattern from lining up with power-of-two chunk
    # sizes, so a server that repeats or skips a chunk cannot look correct.
    period: int = 65521
    max_chunk: int = 65536
    _buffer: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        block = seeded_bytes(self.period, self.seed)
        repeats = -(-(self.period + self.max_chunk) // self.period)
        self._buffer = memoryview((block * repeats)[: self.period + self.max_chunk])

    def chunk(self, offset: int, size: int) -> memoryview:
        """The `size` bytes of the stream starting at `offset` (size <= max_chunk)."""
        if size > self.max_chunk:
            raise ValueError(f"chunk of {size} bytes is larger than max_chunk={self.max_chunk}")
        start = offset % self.period
        return self._buffer[start : start + size]

    def matches(self, offset: int, data: bytes | memoryview) -> bool:
        return self.chunk(offset, len(data)) == data
