"""Totals over the scoreboard: one sum, shared by /metrics and ``echoctl status``."""

from __future__ import annotations

from pathlib import Path

from echod.scoreboard import NUM_COUNTERS, Counter, Scoreboard, WorkerSlot


def _publish(board: Scoreboard, index: int, accepted: int) -> None:
    counters = [0] * NUM_COUNTERS
    counters[Counter.ACCEPTED] = accepted
    counters[Counter.BYTES_IN] = 10 * accepted
    WorkerSlot(board, index).publish(0.0, 0, counters)


def test_totals_add_the_retired_workers_to_the_live_ones(tmp_path: Path) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    assert board.snapshot().totals() == [0] * NUM_COUNTERS  # no worker yet
    for index, accepted in enumerate((3, 4)):
        board.claim(index, pid=100 + index, generation=1, worker_id=index + 1)
        _publish(board, index, accepted)
    board.fold_into_retired(0)
    board.release(0)
    totals = board.snapshot().totals()
    assert totals[Counter.ACCEPTED] == 7
    assert totals[Counter.BYTES_IN] == 70
    assert len(totals) == NUM_COUNTERS
    board.close()
