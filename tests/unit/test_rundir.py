"""The runtime directory checks (echod.rundir): what is refused, and why."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from echod import exitcodes, logs, rundir
from echod.config import Config
from echod.errors import UnsafeRuntimeDir
from echod.scoreboard import Scoreboard
from echod.server.worker import _enable_stack_dumps

ME = 1000
OTHER = 1001


def fake_stat(mode: int, uid: int = ME) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, uid, 0, 0, 0, 0))


def test_a_private_directory_of_ours_is_fine() -> None:
    assert rundir.problem(fake_stat(stat.S_IFDIR | 0o700), ME) is None
    assert rundir.problem(fake_stat(stat.S_IFDIR | 0o755), ME) is None


def test_a_root_owned_directory_is_fine_for_anyone() -> None:
    assert rundir.problem(fake_stat(stat.S_IFDIR | 0o755, uid=0), ME) is None
    assert rundir.problem(fake_stat(stat.S_IFDIR | 0o755, uid=0), 0) is None


def test_a_symlink_is_refused_whatever_it_points_to() -> None:
    assert rundir.problem(fake_stat(stat.S_IFLNK | 0o777), ME) == "is a symlink"


def test_something_else_than_a_directory_is_refused() -> None:
    assert rundir.problem(fake_stat(stat.S_IFREG | 0o600), ME) == "is not a directory"


def test_someone_elses_directory_is_refused() -> None:
    reason = rundir.problem(fake_stat(stat.S_IFDIR | 0o700, uid=OTHER), ME)
    assert reason == f"is owned by uid {OTHER}, not by uid {ME}"


def test_root_refuses_a_users_directory_unless_it_hands_it_to_that_user() -> None:
    users = fake_stat(stat.S_IFDIR | 0o755, uid=OTHER)
    assert rundir.problem(users, 0) == f"is owned by uid {OTHER}, not by uid 0"
    assert rundir.problem(users, 0, owners=[OTHER]) is None


@pytest.mark.parametrize("mode", [0o770, 0o720, 0o702, 0o777, 0o1777, 0o1770])
def test_a_directory_group_or_others_may_write_is_refused(mode: int) -> None:
    reason = rundir.problem(fake_stat(stat.S_IFDIR | mode), ME)
    assert reason == f"is writable by group or others (mode {mode:04o})"


def test_check_raises_a_one_line_error_with_exit_77(tmp_path: Path) -> None:
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeRuntimeDir) as raised:
        rundir.check(str(link))
    assert raised.value.exit_code == exitcodes.NOPERM == 77
    assert str(raised.value) == (
        f"refusing runtime directory {link}: it is a symlink (it must be yours alone)"
    )


def test_make_creates_a_missing_directory_0700_or_0755_as_root(tmp_path: Path) -> None:
    path = tmp_path / "a" / "run"
    rundir.make(str(path))
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == (0o755 if os.geteuid() == 0 else 0o700)


def test_make_refuses_an_existing_open_directory_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.mkdir()
    path.chmod(0o777)
    with pytest.raises(UnsafeRuntimeDir, match="writable by group or others"):
        rundir.make(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o777


def test_create_exclusive_removes_a_planted_symlink_and_never_writes_through_it(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = tmp_path / "echod-worker-1.stack"
    planted.symlink_to(victim)
    fd = rundir.create_exclusive(str(planted), os.O_WRONLY)
    try:
        os.write(fd, b"stacks")
    finally:
        os.close(fd)
    assert victim.read_text() == "precious"
    assert not planted.is_symlink()
    assert planted.read_text() == "stacks"
    assert stat.S_IMODE(planted.stat().st_mode) == 0o600


def test_create_exclusive_replaces_a_stale_file_with_a_fresh_inode(tmp_path: Path) -> None:
    stale = tmp_path / "echod-worker-2.stack"
    stale.write_text("old")
    held = os.open(stale, os.O_RDONLY)  # someone who opened the old one sees nothing new
    try:
        fd = rundir.create_exclusive(str(stale), os.O_WRONLY)
        os.write(fd, b"new")
        os.close(fd)
        assert os.read(held, 100) == b"old"
    finally:
        os.close(held)
    assert stale.read_text() == "new"


def test_scoreboard_create_does_not_follow_a_planted_temporary_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "echod.scoreboard"
    (tmp_path / f"echod.scoreboard.{os.getpid()}.tmp").symlink_to(victim)
    board = Scoreboard.create(str(path))
    board.close()
    assert victim.read_text() == "precious"
    assert path.is_file() and not path.is_symlink()


def test_scoreboard_attach_refuses_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "echod.scoreboard"
    Scoreboard.create(str(path)).close()
    link = tmp_path / "link.scoreboard"
    link.symlink_to(path)
    with pytest.raises(OSError):
        Scoreboard.attach(str(link), writable=False)


def test_a_workers_stack_dump_never_goes_through_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    pid = os.fork()
    if pid == 0:  # the "worker": its dump path was planted before it started
        try:
            (tmp_path / f"echod-worker-{os.getpid()}.stack").symlink_to(victim)
            _enable_stack_dumps(Config(runtime_dir=str(tmp_path)))
            os.kill(os.getpid(), signal.SIGABRT)  # what the master sends a hung worker
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT
    dump = tmp_path / f"echod-worker-{pid}.stack"
    assert victim.read_text() == "precious"
    assert not dump.is_symlink()
    assert "most recent call first" in dump.read_text()


def test_a_log_file_in_the_runtime_dir_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "echod.log").symlink_to(victim)
    logs.never_follow_symlinks_in(str(run))
    with pytest.raises(OSError):
        logs.ReopenableFileHandler(str(run / "echod.log"))
    elsewhere = tmp_path / "echod.log"  # outside it, an operator's symlink is theirs to make
    elsewhere.symlink_to(victim)
    logs.ReopenableFileHandler(str(elsewhere)).close()
