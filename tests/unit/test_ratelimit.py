"""The shared token buckets behind the UDP rate limits, driven with a fake clock."""

from __future__ import annotations

import os

from echod.limits.ratelimit import (
    ADMIT,
    OVER_SOURCE_RATE,
    OVER_TOTAL_RATE,
    SETS,
    WAYS,
    SharedBuckets,
    source_key,
)


def admitted(admit, key: int, now: float, count: int) -> int:
    return sum(admit(key, now) == ADMIT for _ in range(count))


def per_source(buckets: SharedBuckets, rate: float = 10.0, burst: float = 5.0):
    return buckets.limiter(rate, burst, 0.0, 0.0)


def test_a_new_source_gets_its_burst_then_the_rate() -> None:
    admit = per_source(SharedBuckets.create())
    key = source_key("127.0.0.1")
    assert admitted(admit, key, 100.0, 20) == 5  # burst
    assert admit(key, 100.05) == OVER_SOURCE_RATE  # half a token refilled
    assert admitted(admit, key, 100.35, 20) == 3  # 0.35 s x 10/s: nothing lost above
    assert admitted(admit, key, 200.0, 20) == 5  # refills to the burst, no further


def test_sources_do_not_share_buckets() -> None:
    admit = per_source(SharedBuckets.create())
    assert admitted(admit, source_key("127.0.0.1"), 1.0, 10) == 5
    assert admitted(admit, source_key("127.0.0.2"), 1.0, 10) == 5


def test_colliding_sources_evict_the_least_recently_used() -> None:
    admit = per_source(SharedBuckets.create())
    # WAYS + 1 keys in one set: the oldest one is forgotten and starts afresh
    keys = [1 + index * SETS for index in range(WAYS + 1)]
    for step, key in enumerate(keys):
        assert admitted(admit, key, 10.0 + step * 0.001, 10) == 5
    assert admitted(admit, keys[-1], 10.2, 10) == 1  # still tracked: ~1.9 tokens refilled
    assert admitted(admit, keys[0], 10.2, 10) == 5  # was evicted: a fresh bucket


def test_clock_skew_between_workers_never_adds_tokens() -> None:
    admit = per_source(SharedBuckets.create())
    key = source_key("::1")
    assert admitted(admit, key, 50.0, 5) == 5
    assert admitted(admit, key, 49.9, 5) == 0  # another worker's slightly older "now"


def test_the_global_bucket_counts_every_source() -> None:
    admit = SharedBuckets.create().limiter(0.0, 0.0, 100.0, 100.0)
    verdicts = [admit(key, 5.0) for key in range(300)]
    assert verdicts.count(ADMIT) == 100
    assert verdicts.count(OVER_TOTAL_RATE) == 200
    assert sum(admit(key, 5.5) == ADMIT for key in range(300)) == 50


def test_a_datagram_over_the_global_cap_does_not_charge_its_source() -> None:
    buckets = SharedBuckets.create()
    admit = buckets.limiter(10.0, 5.0, 1.0, 1.0)
    assert admit(1, 3.0) == ADMIT  # takes the only global token
    assert [admit(2, 3.0) for _ in range(10)] == [OVER_TOTAL_RATE] * 10
    assert admitted(buckets.limiter(10.0, 5.0, 0.0, 0.0), 2, 3.0, 10) == 5  # untouched


def test_forked_processes_drain_the_same_buckets_exactly() -> None:
    buckets = SharedBuckets.create()
    key = source_key("127.0.0.1")
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            # four processes racing for a burst of 50 at one instant
            admit = buckets.limiter(1.0, 50.0, 0.0, 0.0)
            os._exit(admitted(admit, key, 7.0, 100))
        children.append(pid)
    wins = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert sum(wins) == 50, wins
