"""The accept-balancing decisions (echod.server.balance), in-process on a real scoreboard
file: who stands aside, who rejoins, how many a woken worker takes."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from echod.scoreboard import Scoreboard, WorkerSlot
from echod.server.balance import AcceptBalancer, AcceptState, allowance


@pytest.fixture
def board(tmp_path: Path):
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    yield board
    board.close()


def worker(board: Scoreboard, index: int, state: AcceptState, active: int) -> AcceptBalancer:
    board.claim(index, pid=os.getpid(), generation=1, worker_id=index + 1)
    slot = WorkerSlot(board, index)
    slot.heartbeat(time.monotonic())
    balancer = AcceptBalancer(slot, heartbeat_interval=1.0)
    balancer.set_state(state)
    balancer.set_open(active)
    balancer.open()
    return balancer


def test_allowance_grows_with_the_load() -> None:
    assert allowance(0) == 1
    assert allowance(50) == 54
    assert allowance(1600) == 1701


def test_a_lone_worker_takes_a_full_batch_and_never_stands_aside(board) -> None:
    me = worker(board, 0, AcceptState.LISTENING, 500)
    assert me.accept_budget(500, 64) == 64
    assert not me.should_stand_aside(500)


def test_a_woken_worker_takes_at_least_one_and_no_more_than_its_share(board) -> None:
    me = worker(board, 0, AcceptState.LISTENING, 10)
    worker(board, 1, AcceptState.LISTENING, 8)
    assert me.accept_budget(10, 64) == 1  # allowance(8) = 9: over, but take what woke us
    assert me.accept_budget(2, 64) == 7


def test_over_its_share_a_worker_stands_aside_while_another_listens(board) -> None:
    me = worker(board, 0, AcceptState.LISTENING, 20)
    worker(board, 1, AcceptState.LISTENING, 5)
    assert me.should_stand_aside(20)
    assert me.state == AcceptState.ASIDE
    assert not me.should_rejoin(20)
    assert me.should_rejoin(6)


def test_the_last_listener_stays_when_nobody_could_take_over(board) -> None:
    me = worker(board, 0, AcceptState.LISTENING, 20)
    worker(board, 1, AcceptState.OFF, 0)  # draining or full: not a candidate
    assert not me.should_stand_aside(20)
    assert me.state == AcceptState.LISTENING


def test_the_last_listener_hands_over_to_a_peer_standing_aside(board) -> None:
    me = worker(board, 0, AcceptState.LISTENING, 30)
    peer = worker(board, 1, AcceptState.ASIDE, 10)
    assert me.should_stand_aside(30)  # nudges the peer (SIGURG: ignored by this process)
    assert peer.should_rejoin(10)  # nobody listens now: the peer goes back


def test_a_peer_with_a_late_heartbeat_does_not_count(board) -> None:
    me = worker(board, 0, AcceptState.LISTENING, 20)
    hung = worker(board, 1, AcceptState.LISTENING, 0)
    hung.slot.heartbeat(time.monotonic() - 10)
    assert me.accept_budget(20, 64) == 64  # no live peer: as if alone
    assert not me.should_stand_aside(20)


def test_peers_are_read_again_when_the_roster_changes(board) -> None:
    me = worker(board, 0, AcceptState.LISTENING, 10)
    assert not me.has_peers()
    worker(board, 3, AcceptState.LISTENING, 0)
    assert me.has_peers()
    board.release(3)
    assert not me.has_peers()


def test_a_peer_stopped_while_deciding_does_not_stop_the_others(board, tmp_path) -> None:
    # A hung peer may hold the "last listener" lock: after a short wait this worker
    # stays in the queue (the safe answer) instead of hanging too, and stops asking
    # for a while.
    me = worker(board, 0, AcceptState.LISTENING, 20)
    worker(board, 1, AcceptState.LISTENING, 5)
    held = os.open(tmp_path / "echod.scoreboard", os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        assert not me.should_stand_aside(20)
        assert time.monotonic() - started < 5.0  # gave up waiting
        assert me.state == AcceptState.LISTENING
        assert me.lock_wedged_until > time.monotonic()
    finally:
        os.close(held)
    assert not me.should_stand_aside(20)  # still within the pause: does not ask
    me.lock_wedged_until = 0.0  # the pause is over
    assert me.should_stand_aside(20)  # lock free again: over its share, it steps aside
    assert me.state == AcceptState.ASIDE
