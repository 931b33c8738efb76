"""max_worker_memory is the worker's own decision, in its housekeeping: in process.

A real ``Worker`` (no listeners, no fork) on a real scoreboard file, with its
USS sampler replaced by a script of numbers and time passed in by the test.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod.config import Config
from echod.limits.admission import SharedLimits
from echod.scoreboard import Scoreboard, State, WorkerSlot
from echod.server.worker import Worker, WorkerIdentity
from echod.server.worker_memory import MEMORY_SAMPLE_INTERVAL, MemoryLimit, own_uss_sampler


class Script:
    """A sampler returning the next number each time; counts the calls."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.values.pop(0)


def test_samples_every_interval_the_first_one_interval_after_start() -> None:
    sampler = Script(900, 1200)
    limit = MemoryLimit(1000, sampler, now=100.0)
    assert limit.exceeded(100.0 + MEMORY_SAMPLE_INTERVAL - 0.01) == 0
    assert sampler.calls == 0  # not due: psutil is not even asked
    assert limit.exceeded(100.0 + MEMORY_SAMPLE_INTERVAL) == 0  # 900: under the limit
    assert limit.exceeded(100.0 + 1.5 * MEMORY_SAMPLE_INTERVAL) == 0
    assert sampler.calls == 1
    assert limit.exceeded(100.0 + 2 * MEMORY_SAMPLE_INTERVAL) == 1200
    assert sampler.calls == 2


def test_the_real_sampler_reads_this_process() -> None:
    assert own_uss_sampler()() > 0


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Scoreboard]:
    scoreboard = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    yield scoreboard
    scoreboard.unlink()


def _worker(board: Scoreboard, **settings: object) -> Worker:
    board.claim(0, pid=os.getpid(), generation=1, worker_id=1)
    return Worker(
        Config(**settings),
        [],
        WorkerSlot(board, 0),  # type: ignore[arg-type]
        WorkerIdentity(1, 1, os.getppid()),
        -1,
        SharedLimits(),
    )


def test_a_worker_over_the_limit_asks_once_to_be_recycled(board, caplog) -> None:
    caplog.set_level(logging.INFO, "echod.worker")
    worker = _worker(board, max_worker_memory=1000)
    sampler = Script(999, 5000, 6000)
    worker.memory_limit = MemoryLimit(1000, sampler, now=0.0)
    try:
        worker._housekeeping(MEMORY_SAMPLE_INTERVAL)  # 999: not over
        assert board.slot(0).state != State.RETIRING
        assert worker.next_housekeeping <= 2 * MEMORY_SAMPLE_INTERVAL
        worker._housekeeping(2 * MEMORY_SAMPLE_INTERVAL)  # 5000: over
        assert board.slot(0).state == State.RETIRING  # the master replaces it, then drains it
        assert "recycling: memory 5000 bytes > max_worker_memory 1000" in caplog.text
        worker._housekeeping(10 * MEMORY_SAMPLE_INTERVAL)
        assert sampler.calls == 2 and caplog.text.count("recycling") == 1  # asked once
    finally:
        worker.epoll.close()


def test_no_limit_no_sampling_and_an_unreadable_memory_stops_it(board, caplog) -> None:
    worker = _worker(board)
    assert worker.memory_limit is None
    worker.epoll.close()

    def unreadable() -> int:
        raise OSError("access denied")

    worker = _worker(board, max_worker_memory=1000)
    worker.memory_limit = MemoryLimit(1000, unreadable, now=0.0)
    try:
        worker._housekeeping(MEMORY_SAMPLE_INTERVAL)
        assert worker.memory_limit is None and "access denied" in caplog.text
        assert board.slot(0).state != State.RETIRING  # never recycled on a guess
    finally:
        worker.epoll.close()
