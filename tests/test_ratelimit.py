"""The shared token buckets behind the UDP rate limits, driven with a fake clock."""

from __future__ import annotations

import os

from echod.ratelimit import SETS, WAYS, SharedBuckets, source_key


def admitted(buckets: SharedBuckets, key: int, now: float, count: int,
             rate: float = 10.0, burst: float = 5.0) -> int:
    return sum(buckets.admit_source(key, now, rate, burst) for _ in range(count))


def test_a_new_source_gets_its_burst_then_the_rate() -> None:
    buckets = SharedBuckets.create()
    key = source_key("127.0.0.1")
    assert admitted(buckets, key, 100.0, 20) == 5  # burst
    assert admitted(buckets, key, 100.05, 20) == 0  # half a token refilled
    assert admitted(buckets, key, 100.35, 20) == 3  # 0.35 s x 10/s: nothing lost above
    assert admitted(buckets, key, 200.0, 20) == 5  # refills to the burst, no further


def test_sources_do_not_share_buckets() -> None:
    buckets = SharedBuckets.create()
    assert admitted(buckets, source_key("127.0.0.1"), 1.0, 10) == 5
    assert admitted(buckets, source_key("127.0.0.2"), 1.0, 10) == 5


def test_colliding_sources_evict_the_least_recently_used() -> None:
    buckets = SharedBuckets.create()
    # WAYS + 1 keys in one set: the oldest one is forgotten and starts afresh
    keys = [1 + index * SETS for index in range(WAYS + 1)]
    for step, key in enumerate(keys):
        assert admitted(buckets, key, 10.0 + step * 0.001, 10) == 5
    assert admitted(buckets, keys[-1], 10.2, 10) == 1  # still tracked: ~1.9 tokens refilled
    assert admitted(buckets, keys[0], 10.2, 10) == 5  # was evicted: a fresh bucket


def test_clock_skew_between_workers_never_adds_tokens() -> None:
    buckets = SharedBuckets.create()
    key = source_key("::1")
    assert admitted(buckets, key, 50.0, 5) == 5
    assert admitted(buckets, key, 49.9, 5) == 0  # another worker's slightly older "now"


def test_the_global_bucket() -> None:
    buckets = SharedBuckets.create()
    assert sum(buckets.admit_global(5.0, 100.0, 100.0) for _ in range(300)) == 100
    assert sum(buckets.admit_global(5.5, 100.0, 100.0) for _ in range(300)) == 50


def test_forked_processes_drain_the_same_bucket() -> None:
    buckets = SharedBuckets.create()
    key = source_key("127.0.0.1")
    pid = os.fork()
    if pid == 0:
        os._exit(admitted(buckets, key, 7.0, 3))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert admitted(buckets, key, 7.0, 10) == 2  # the child took 3 of the burst of 5
