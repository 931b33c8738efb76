"""drop_privileges() and friends. Every drop happens in a forked child, never in pytest."""

from __future__ import annotations

import grp
import json
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from echod import exitcodes
from echod.errors import PrivilegeError
from echod.system.privileges import Identity, chown_for, drop_privileges, resolve_identity

is_root = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")
NOGROUP_GID = grp.getgrnam("nogroup").gr_gid


def in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run body in a forked child; return its result, or {"error": ...} if it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            try:
                result = body()
            except PrivilegeError as exc:
                result = {"error": str(exc), "exit_code": exc.exit_code}
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return dict(json.loads(data))


def become_nobody_then(body: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """As root, first turn the child into an ordinary user, then run body."""

    def wrapped() -> dict[str, Any]:
        if os.geteuid() == 0:
            os.setgroups([])
            os.setresgid(NOBODY.pw_gid, NOBODY.pw_gid, NOBODY.pw_gid)
            os.setresuid(NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_uid)
        return body()

    return wrapped


def test_nothing_requested_is_a_noop() -> None:
    drop_privileges(None, None)
    chown_for(None, None, ["/nonexistent"])


def test_non_root_asking_for_a_user_is_a_clear_error() -> None:
    def attempt() -> dict[str, Any]:
        drop_privileges("nobody", None)
        return {"dropped": True}

    result = in_child(become_nobody_then(attempt))
    assert result["exit_code"] == exitcodes.NOPERM
    uid = NOBODY.pw_uid if is_root else os.geteuid()
    assert result["error"] == (
        f"--user/--group needs root, but echod runs as uid {uid};"
        " start it as root or drop --user/--group"
    )


def test_non_root_chown_for_is_a_clear_error(tmp_path: Path) -> None:
    def attempt() -> dict[str, Any]:
        chown_for(None, "nogroup", [tmp_path])
        return {"chowned": True}

    assert "needs root" in in_child(become_nobody_then(attempt))["error"]


@pytest.mark.parametrize("user", ["nobody", str(NOBODY.pw_uid)])
def test_resolve_user_by_name_or_number(user: str) -> None:
    assert resolve_identity(user, None) == Identity(
        uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, user_name="nobody"
    )


def test_resolve_group_overrides_the_primary_group() -> None:
    identity = resolve_identity("nobody", "0")
    assert (identity.uid, identity.gid) == (NOBODY.pw_uid, 0)
    assert resolve_identity(None, "0") == Identity(uid=None, gid=0, user_name=None)


def test_resolve_unknown_names() -> None:
    with pytest.raises(PrivilegeError, match=r"unknown user 'no-such-echod-user' \(--user\)"):
        resolve_identity("no-such-echod-user", None)
    with pytest.raises(PrivilegeError, match=r"unknown group 'no-such-echod-group' \(--group\)"):
        resolve_identity("nobody", "no-such-echod-group")


def test_resolve_uid_without_passwd_entry_needs_a_group() -> None:
    unused_uid = next(uid for uid in range(48_000, 49_000) if not _has_passwd_entry(uid))
    with pytest.raises(PrivilegeError, match="give --group too"):
        resolve_identity(str(unused_uid), None)
    assert resolve_identity(str(unused_uid), "nogroup").uid == unused_uid


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("group", [None, "nogroup"])
@pytest.mark.root
@pytest.mark.skipif(not is_root, reason="needs root")
def test_root_drops_to_nobody_for_good(group: str | None) -> None:
    def drop() -> dict[str, Any]:
        drop_privileges("nobody", group)
        try:
            os.setuid(0)
            regained = True
        except PermissionError:
            regained = False
        return {
            "resuid": os.getresuid(),
            "resgid": os.getresgid(),
            "groups": sorted(os.getgroups()),
            "regained": regained,
        }

    result = in_child(drop)
    gid = NOBODY.pw_gid if group is None else NOGROUP_GID
    assert result["resuid"] == [NOBODY.pw_uid] * 3
    assert result["resgid"] == [gid] * 3
    assert result["groups"] == sorted(set(os.getgrouplist("nobody", gid)))  # not root's
    assert result["regained"] is False


@pytest.mark.root
@pytest.mark.skipif(not is_root, reason="needs root")
def test_root_drops_group_only() -> None:
    def drop() -> dict[str, Any]:
        drop_privileges(None, "nogroup")
        return {"resuid": os.getresuid(), "resgid": os.getresgid(), "groups": os.getgroups()}

    result = in_child(drop)
    assert result["resuid"] == [0, 0, 0]
    assert result["resgid"] == [NOGROUP_GID] * 3
    assert result["groups"] == [NOGROUP_GID]


@pytest.mark.root
@pytest.mark.skipif(not is_root, reason="needs root")
def test_chown_for_hands_existing_paths_over(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir()
    log_file = tmp_path / "echod.log"
    log_file.write_text("")
    chown_for("nobody", None, [runtime_dir, log_file, tmp_path / "not-yet-created.log"])
    for path in (runtime_dir, log_file):
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    chown_for(None, "0", [log_file])  # group only: the owner stays
    assert (log_file.stat().st_uid, log_file.stat().st_gid) == (NOBODY.pw_uid, 0)
