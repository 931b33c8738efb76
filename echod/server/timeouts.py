"""Connection deadlines (idle timeout, lifetime limit) without scanning connections.

A coarse timer wheel: each connection sits in the slot of its deadline, rounded
up to ``resolution``. Adding and discarding are O(1) dict operations, so a
closed connection leaves at once (connection churn leaves nothing behind), and
a due slot is found through a small heap of slot numbers. The worker re-files a
connection that turned out to be active when its slot came due, so each busy
connection is looked at about once per timeout, never per event.
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

T = TypeVar("T")


class TimeoutWheel(Generic[T]):
    def __init__(self, resolution: float) -> None:
        self.resolution = resolution
        self._slots: dict[int, dict[int, T]] = {}  # slot number -> {key: item}
        self._slot_of: dict[int, int] = {}  # key -> slot number
        self._due_order: list[int] = []  # heap of the slot numbers in _slots

    @classmethod
    def for_timeout(cls, timeout: float) -> TimeoutWheel[T]:
        """A wheel whose firing is late by at most ~1/16 of the timeout (and ≤ 1 s)."""
        return cls(max(0.005, min(1.0, timeout / 16)))

    def __len__(self) -> int:
        return len(self._slot_of)

    def add(self, key: int, item: T, deadline: float) -> None:
        """File ``item`` (replacing any earlier entry under ``key``) to fire at ``deadline``."""
        self.discard(key)
        slot = math.ceil(deadline / self.resolution)
        bucket = self._slots.get(slot)
        if bucket is None:
            bucket = self._slots[slot] = {}
            heapq.heappush(self._due_order, slot)
        bucket[key] = item
        self._slot_of[key] = slot

    def discard(self, key: int) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            del self._slots[slot][key]  # an emptied slot stays until due: no heap surgery

    def next_deadline(self) -> float | None:
        """When the earliest slot is due (it may have emptied: firing it then is
        harmless), or None when the wheel holds nothing. An emptied slot alone must
        not set a deadline: callers skip ``pop_due`` on an empty wheel, so a stale
        slot in the past would ask for housekeeping at once, every iteration."""
        return self._due_order[0] * self.resolution if self._slot_of else None

    def pop_due(self, now: float) -> list[T]:
        """Remove and return every item whose slot is due at ``now``."""
        due: list[T] = []
        order = self._due_order
        while order and order[0] * self.resolution <= now:
            bucket = self._slots.pop(heapq.heappop(order))
            for key in bucket:
                del self._slot_of[key]
            due.extend(bucket.values())
        return due
