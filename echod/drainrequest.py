"""``echoctl drain``: a request file beside the pidfile that the master follows.

Why a file and not a signal: it says the state wanted, not a change, so a
repeated drain is harmless, an undrain can never be merged with a drain by the
kernel, and it holds across HUP and an in-place upgrade (USR2) by itself. A
master that predates draining ignores it (an unknown signal's default action
would kill it). Whoever may create files in the runtime directory (its owner
or root: see ``rundir``) may drain; the master trusts the file only if it is a
regular file, not a symlink, owned by its own user or root.
"""

from __future__ import annotations

import os
import stat

from echod import rundir


def drain_request_path(pidfile: str) -> str:
    """One request per pidfile, beside it, as the scoreboard is."""
    base = pidfile[:-4] if pidfile.endswith(".pid") else pidfile
    return base + ".drain"


def request(path: str) -> None:
    """Ask to drain: a fresh file of ours (never through a planted symlink)."""
    os.close(rundir.create_exclusive(path, os.O_WRONLY, 0o644))


def withdraw(path: str) -> bool:
    """Ask to serve again; True if there was a request to withdraw."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def requested(path: str, euid: int) -> bool:
    """Whether a trustworthy request is in place (for a master running as `euid`)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid in (euid, 0)
