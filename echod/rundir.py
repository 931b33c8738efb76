"""The runtime directory must be ours alone, as tmux, ssh-agent and systemd insist.

Whoever controls the directory that holds the pidfile, the scoreboard and the
stack dumps can swap them under echoctl or plant symlinks for echod to write
through. So echod (before creating anything there) and echoctl (before trusting
anything there) refuse a directory that is a symlink, is not a directory, is
owned by someone other than the running user or root, or that group or others
may write to. Files echod creates there are opened with O_NOFOLLOW as well.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection

from echod.errors import EchodError, UnsafeRuntimeDir

# Whose directory a default, created one is: the user's alone, like /tmp/tmux-$UID.
PRIVATE_MODE = 0o700
# Root's (/run/echod): readable by other users' echoctl, writable by root alone.
SHARED_MODE = 0o755


def problem(st: os.stat_result, euid: int, owners: Collection[int] = ()) -> str | None:
    """Why a directory with this lstat() result is unsafe for ``euid``; None if it is fine.

    ``owners``: further uids trusted to own it (the --user echod hands it to).
    """
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in {euid, 0, *owners}:
        return f"is owned by uid {st.st_uid}, not by uid {euid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check(path: str, owners: Collection[int] = ()) -> os.stat_result:
    """Raise UnsafeRuntimeDir (exit 77) unless ``path`` is safe; FileNotFoundError passes."""
    st = os.lstat(path)
    reason = problem(st, os.geteuid(), owners)
    if reason is not None:
        raise UnsafeRuntimeDir(
            f"refusing runtime directory {path}: it {reason} (it must be yours alone)"
        )
    return st


def make(path: str, owners: Collection[int] = ()) -> None:
    """Create ``path`` if missing (0700, or 0755 as root), then :func:`check` it."""
    mode = SHARED_MODE if os.geteuid() == 0 else PRIVATE_MODE
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        pass  # a symlink to nowhere, a file: check() names it
    except OSError as exc:
        raise EchodError(f"cannot create runtime directory {path}: {exc.strerror}") from None
    check(path, owners)


def create_exclusive(path: str, flags: int, mode: int = 0o600) -> int:
    """Open a new file at ``path`` that is certainly ours: never through a symlink.

    A stale file (or a planted one) at ``path`` is unlinked first, the symlink
    itself rather than what it points to; ``O_EXCL`` then guarantees the inode is
    the one we made. OSError if that fails twice.
    """
    flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)
    return os.open(path, flags, mode)
