"""The shutdown delay's end in the scoreboard header: what `echoctl stop` reads."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from echod.scoreboard import MAX_SHUTDOWN_DELAY, MasterStatus, Scoreboard


@pytest.mark.parametrize("delay", [0.2, 12.0, MAX_SHUTDOWN_DELAY])
def test_the_delay_left_is_published_rounded_up(tmp_path: Path, delay: float) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    now = time.monotonic()
    board.set_shutdown_ends(now + delay)
    board.set_master_status(MasterStatus.SHUTTING_DOWN)
    left = board.master().shutdown_delay_left(now)
    assert delay <= left <= delay + 1
    assert board.master().shutdown_delay_left(now + delay + 5) == 0.0  # passed


@pytest.mark.parametrize("now", [100.0, 100.5, 100.95])
def test_the_two_roundings_add_at_most_a_second(tmp_path: Path, now: float) -> None:
    # the end is rounded up when published; a `now` late in its second once added
    # another second on top (0.2 s left read as 2 s)
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    board.set_shutdown_ends(now + 0.2)
    board.set_master_status(MasterStatus.SHUTTING_DOWN)
    assert 0.2 <= board.master().shutdown_delay_left(now) <= 1.2


def test_nothing_is_left_outside_shutting_down(tmp_path: Path) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    now = time.monotonic()
    board.set_shutdown_ends(now + 30)
    board.set_master_status(MasterStatus.STOPPING)
    assert board.master().shutdown_delay_left(now) == 0.0


def test_an_older_image_status_write_reads_as_not_published(tmp_path: Path) -> None:
    board = Scoreboard.create(str(tmp_path / "echod.scoreboard"))
    board.set_shutdown_ends(time.monotonic() + 30)
    # what an image before the delay's end was published writes: status, 3 pad bytes
    struct.pack_into("<B3x", board.buffer, 372, MasterStatus.SHUTTING_DOWN)
    view = board.master()
    assert view.status is MasterStatus.SHUTTING_DOWN
    assert view.shutdown_delay_left(time.monotonic()) == 0.0
