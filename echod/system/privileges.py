"""Dropping root privileges after the sockets are bound (``--user`` / ``--group``).

echod may need root only to bind ports below 1024; once they are bound, the
master and every worker should run as an ordinary user. The drop must be
complete (no saved or effective id can take root back), and a typo in a user
name must reach the terminal, so resolving names is separate from the drop
and cheap enough to run while the config is validated, before daemonizing.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

from echod.errors import PrivilegeError


@dataclass(frozen=True)
class Identity:
    """Who the master and workers run as after the drop."""

    uid: int | None  # None: keep the current user (only --group was given)
    gid: int
    user_name: str | None  # for initgroups(); None for a uid without a passwd entry

    def describe(self) -> str:
        who = self.user_name or (str(self.uid) if self.uid is not None else "(unchanged)")
        return f"user {who}, gid {self.gid}"


def _lookup_user(user: str) -> tuple[int, int | None, str | None]:
    """(uid, primary gid, name) for a user name or a numeric uid."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():  # a bare uid is fine (containers, DynamicUser-like setups)
            return int(user), None, None
        raise PrivilegeError(f"unknown user {user!r} (--user)") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _lookup_group(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise PrivilegeError(f"unknown group {group!r} (--group)") from None


def resolve_identity(user: str | None, group: str | None) -> Identity:
    """Names or numeric ids to uid/gid (the user's primary group when ``group`` is None).

    Raises PrivilegeError (exit 77) for an unknown user or group; no side effects.
    """
    if user is None and group is None:
        raise ValueError("resolve_identity() needs a user or a group")
    uid: int | None = None
    user_name: str | None = None
    primary_gid: int | None = None
    if user is not None:
        uid, primary_gid, user_name = _lookup_user(user)
    if group is not None:
        gid = _lookup_group(group)
    elif primary_gid is not None:
        gid = primary_gid
    else:
        raise PrivilegeError(f"user {user} has no passwd entry, so give --group too")
    return Identity(uid=uid, gid=gid, user_name=user_name)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"{what} needs root, but echod runs as uid {os.geteuid()};"
            " start it as root or drop --user/--group"
        )


def drop_privileges(user: str | None, group: str | None) -> None:
    """setgid, then the user's supplementary groups, then setuid, and verify the result.

    A no-op when both are None; otherwise root only. Any failure raises PrivilegeError.
    """
    if user is None and group is None:
        return
    _require_root("--user/--group")
    identity = resolve_identity(user, group)
    try:
        os.setresgid(identity.gid, identity.gid, identity.gid)
        if identity.user_name is not None:
            os.initgroups(identity.user_name, identity.gid)
        else:
            os.setgroups([identity.gid])  # never keep root's supplementary groups
        if identity.uid is not None:
            os.setresuid(identity.uid, identity.uid, identity.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to {identity.describe()}: {exc.strerror}") from exc
    _verify_dropped(identity)


def _verify_dropped(identity: Identity) -> None:
    if os.getresgid() != (identity.gid,) * 3:
        raise PrivilegeError(f"group ids are {os.getresgid()} after setting gid {identity.gid}")
    if identity.uid is None:
        return  # only the group changed: root stays root by request
    if os.getresuid() != (identity.uid,) * 3:
        raise PrivilegeError(f"user ids are {os.getresuid()} after setting uid {identity.uid}")
    if identity.uid == 0:
        return  # --user root: nothing to give up
    try:
        os.setuid(0)
    except PermissionError:
        return  # the point of the exercise
    raise PrivilegeError(f"could regain root after switching to {identity.describe()}")


def chown_for(user: str | None, group: str | None, paths: Iterable[str | os.PathLike[str]]) -> None:
    """Give the target identity the existing ``paths`` (runtime dir, log file) before the drop.

    Missing paths are skipped. Root only, like the drop.
    """
    if user is None and group is None:
        return
    _require_root("--user/--group")
    identity = resolve_identity(user, group)
    uid = identity.uid if identity.uid is not None else -1  # -1: leave the owner as is
    for path in paths:
        try:
            os.chown(path, uid, identity.gid, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise PrivilegeError(
                f"cannot hand {path} to {identity.describe()}: {exc.strerror}"
            ) from exc
