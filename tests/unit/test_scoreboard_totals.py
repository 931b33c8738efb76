"""Totals over the scoreboard: one sum, shared by /metrics and ``echoctl status``."""

from __future__ import annotations

from pathlib import Path

from echod.scoreboard import (
    NUM_COUNTERS,
    UDP_DROP_SOCKETS_RETIRED,
    Counter,
    Scoreboard,
    WorkerSlot,
)


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


def test_kernel_drops_are_the_most_any_worker_saw_per_socket(tmp_path: Path) -> None:
    """SO_RXQ_OVFL is cumulative per socket and every worker reads the same socket:
    the figure is a maximum per socket, not a sum, and survives the workers."""
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    for index in range(2):
        board.claim(index, pid=100 + index, generation=1, worker_id=index + 1)
    WorkerSlot(board, 0).publish_udp_drops(((7001, 40), (7002, 5)))
    WorkerSlot(board, 1).publish_udp_drops(((7001, 42),))  # saw a later datagram
    assert board.snapshot().udp_drops_by_socket() == {7001: 42, 7002: 5}
    assert board.snapshot().udp_receive_buffer_drops() == 47
    board.fold_into_retired(1)
    board.release(1)
    assert board.snapshot().udp_receive_buffer_drops() == 47  # reaped: kept, not lost
    board.claim(1, pid=102, generation=2, worker_id=3)  # its successor starts at 0
    assert board.snapshot().udp_receive_buffer_drops() == 47
    WorkerSlot(board, 1).publish_udp_drops(((7001, 50),))
    assert board.snapshot().udp_receive_buffer_drops() == 55
    board.close()


def test_kernel_drops_of_many_retired_sockets_move_to_one_total(tmp_path: Path) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    sockets = range(1, UDP_DROP_SOCKETS_RETIRED + 3)
    for inode in sockets:  # one short-lived worker per socket, as reloads could leave
        board.claim(0, pid=100, generation=inode, worker_id=inode)
        WorkerSlot(board, 0).publish_udp_drops(((inode, 10),))
        board.fold_into_retired(0)
        board.release(0)
        assert board.snapshot().udp_receive_buffer_drops() == 10 * inode
    assert len(board.master().udp_drops) == UDP_DROP_SOCKETS_RETIRED
    board.close()
