"""Latency statistics: ping-style min/avg/max/mdev, and a histogram for percentiles."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RttStats:
    """min/avg/max/mdev of a set of round-trip times, in milliseconds, as ping reports them."""

    count: int
    min_ms: float
    avg_ms: float
    max_ms: float
    mdev_ms: float  # population standard deviation, like ping's mdev

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> RttStats | None:
        if not samples_ms:
            return None
        return cls(
            count=len(samples_ms),
            min_ms=min(samples_ms),
            avg_ms=statistics.fmean(samples_ms),
            max_ms=max(samples_ms),
            mdev_ms=statistics.pstdev(samples_ms),
        )

    def to_json(self) -> dict[str, float]:
        return {
            "min": round(self.min_ms, 6),
            "avg": round(self.avg_ms, 6),
            "max": round(self.max_ms, 6),
            "mdev": round(self.mdev_ms, 6),
        }


# Bucket boundaries grow by 1% so a reported percentile is within 1% of the
# truth, while a day's worth of samples still fits in a few thousand counters.
_GROWTH = 1.01
_INV_LOG_GROWTH = 1.0 / math.log(_GROWTH)
_SMALLEST_US = 1.0  # everything under a microsecond shares bucket 0

REPORTED_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99.9", 0.999),
)


@dataclass
class LatencyHistogram:
    """A log-bucketed latency histogram: constant memory, cheap to record, mergeable.

    Bench workers each fill one and the parent merges them; exact min and max
    are kept beside the buckets.
    """

    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total_s: float = 0.0
    min_s: float = math.inf
    max_s: float = 0.0

    def record(self, seconds: float) -> None:
        micros = seconds * 1e6
        bucket = 0 if micros < _SMALLEST_US else 1 + int(math.log(micros) * _INV_LOG_GROWTH)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.count += 1
        self.total_s += seconds
        self.min_s = min(self.min_s, seconds)
        self.max_s = max(self.max_s, seconds)

    def merge(self, other: LatencyHistogram) -> None:
        for bucket, number in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + number
        self.count += other.count
        self.total_s += other.total_s
        self.min_s = min(self.min_s, other.min_s)
        self.max_s = max(self.max_s, other.max_s)

    @classmethod
    def merged(cls, histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
        total = cls()
        for histogram in histograms:
            total.merge(histogram)
        return total

    def percentile_s(self, fraction: float) -> float:
        """The upper bound of the bucket holding the percentile, clamped to [min, max]."""
        if not self.count:
            raise ValueError("percentile of an empty histogram")
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                upper_s = (_GROWTH**bucket) * _SMALLEST_US / 1e6 if bucket else _SMALLEST_US / 1e6
                return min(max(upper_s, self.min_s), self.max_s)
        return self.max_s

    def summary_ms(self) -> dict[str, float] | None:
        """min/avg/percentiles/max in milliseconds, or None when nothing was recorded."""
        if not self.count:
            return None
        summary = {"min": self.min_s * 1e3, "avg": self.total_s / self.count * 1e3}
        for name, fraction in REPORTED_PERCENTILES:
            summary[name] = self.percentile_s(fraction) * 1e3
        summary["max"] = self.max_s * 1e3
        return summary
