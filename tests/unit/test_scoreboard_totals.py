"""Totals over the scoreboard: one sum, shared by /metrics and ``echoctl status``."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

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


def test_a_reader_never_sees_a_publish_half_done(tmp_path: Path) -> None:
    """A worker publishing in a tight loop while another process reads: no total
    ever goes backwards. (struct.pack_into zeroes its destination before packing;
    with it, about one read in seven here saw a worker's counts as 0.)"""
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    board.claim(0, pid=os.getpid(), generation=1, worker_id=1)
    _publish(board, 0, 1_000_000)
    WorkerSlot(board, 0).set_active(1)
    writer = os.fork()
    if writer == 0:  # the worker: publish rising counts until the reader has read enough
        try:
            slot, accepted = WorkerSlot(board, 0), 1_000_000
            while accepted < 1_000_000 + 5_000_000 and os.getppid() != 1:
                accepted += 1
                counters = [accepted] * NUM_COUNTERS
                slot.publish(float(accepted), accepted % 100 + 1, counters)
                slot.set_active(accepted % 100 + 1)
        finally:
            os._exit(0)
    try:
        started = time.monotonic()
        while board.slot(0).counters[Counter.ACCEPTED] == 1_000_000:  # the writer is up
            assert time.monotonic() - started < 30, "the writer never published"
        previous, reads = 0, 0
        while reads < 100_000:
            slot = board.slot(0)  # what snapshot() reads of each slot, minus the scan
            accepted = slot.counters[Counter.ACCEPTED]
            assert accepted >= previous, f"read {reads}: count went {previous} -> {accepted}"
            assert slot.active > 0
            previous, reads = accepted, reads + 1
    finally:
        os.kill(writer, signal.SIGKILL)
        os.waitpid(writer, 0)
        board.close()


def test_a_reader_waits_out_a_slow_fold_instead_of_counting_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    board.claim(0, pid=100, generation=1, worker_id=1)
    _publish(board, 0, 5)
    header_written = threading.Event()
    write_header = board._write_header

    def descheduled_mid_fold(**fields: object) -> None:
        write_header(**fields)  # the retired totals hold the 5; the slot still does too
        header_written.set()
        time.sleep(0.5)

    monkeypatch.setattr(board, "_write_header", descheduled_mid_fold)
    folding = threading.Thread(target=board.fold_into_retired, args=(0,))
    folding.start()
    try:
        assert header_written.wait(10)
        assert board.snapshot().totals()[Counter.ACCEPTED] == 5  # not 10
    finally:
        folding.join(10)
        board.close()
