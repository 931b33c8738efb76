"""When a draining worker closes what is still open at the end of its time limit.

A worker told to drain (TERM: a stop, or retirement by HUP, USR2, TTOU or
recycling) serves its open connections until its time limit, then closes the
rest. With ``close_spread`` it does not close them all in the same instant (every
client would reconnect at once): it closes them one by one, evenly over a window
that ENDS at the limit, so the limit stays the limit (the stop's total stays
inside graceful_timeout, and so inside systemd's TimeoutStopSec). A window longer
than the limit is clamped to it. The worker feeds it the time and its count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger("echod.worker")

NEVER = math.inf
# At most this often: with 100k connections an even spread would wake the worker
# every few microseconds; instead each wake-up closes the ones due since the last.
MIN_STEP = 0.01


@dataclass(frozen=True)
class ClosePlan:
    deadline: float  # every connection closed by then (time.monotonic()); NEVER: not forced
    spread: float  # seconds before the deadline over which closes are spread

    @classmethod
    def starting(cls, now: float, limit: float, close_spread: float) -> ClosePlan:
        """`limit`: seconds from `now` (math.inf: never force)."""
        if not math.isfinite(limit):
            return cls(NEVER, 0.0)
        return cls(now + limit, min(close_spread, limit))

    @property
    def spread_from(self) -> float:
        return self.deadline - self.spread

    def tightened(self, other: ClosePlan) -> ClosePlan:
        """A second TERM (a stop while a reload's drain runs) can only shorten it."""
        return other if other.deadline < self.deadline else self


@dataclass
class CloseSpread:
    """`total` connections closed evenly over [start, end): the k-th (from 0) at
    start + k * (end - start) / total, so the last one goes a step before the end."""

    start: float
    end: float
    total: int
    closed: int = 0

    def due(self, now: float) -> int:
        """How many to close now (the worker closes that many, oldest first)."""
        if now >= self.end or self.end <= self.start:
            wanted = self.total
        elif now < self.start:
            wanted = 0
        else:
            # + 1e-9: at next_at()'s own time, rounding must not leave that one undue
            steps = (now - self.start) * self.total / self.window + 1e-9
            wanted = min(self.total, math.floor(steps) + 1)
        more = max(0, wanted - self.closed)
        self.closed += more
        return more

    def next_at(self, now: float) -> float:
        """When to look again (math.inf once all are closed): when the next close is
        due, but no sooner than MIN_STEP after `now`."""
        if self.closed >= self.total:
            return math.inf
        return max(now + MIN_STEP, self.start + self.closed * self.window / self.total)

    @property
    def window(self) -> float:
        return self.end - self.start


class DrainSchedule:
    """A draining worker's time limit and, with close_spread, its closes under way."""

    def __init__(self, close_spread: float) -> None:
        self.close_spread = close_spread
        self.plan = ClosePlan(NEVER, 0.0)
        self.closes: CloseSpread | None = None

    def begin(self, now: float, limit: float) -> float:
        """TERM: drain for `limit` seconds (a second TERM only brings it forward).
        Returns the deadline, when whatever is still open is closed at once."""
        self.plan = self.plan.tightened(ClosePlan.starting(now, limit, self.close_spread))
        return self.plan.deadline

    def due(self, now: float, still_open: int) -> tuple[int, float]:
        """(connections to close now, when to look again: math.inf = not before the
        deadline)."""
        plan = self.plan
        if plan.spread <= 0:
            return 0, math.inf
        if now < plan.spread_from:
            return 0, plan.spread_from
        if self.closes is None or self.closes.end != plan.deadline:  # (re)started
            self.closes = CloseSpread(now, plan.deadline, still_open)
            log.info(
                "time limit near: closing %d connection(s) over %.1fs (close_spread)",
                still_open,
                plan.deadline - now,
            )
        return self.closes.due(now), self.closes.next_at(now)
