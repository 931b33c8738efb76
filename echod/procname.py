"""Process facts the kernel keeps for us: titles in ps/top, and parent-death signals."""

from __future__ import annotations

import ctypes
import signal

try:
    import setproctitle as _setproctitle
except ImportError:  # optional: titles are a convenience
    _setproctitle = None

PR_SET_PDEATHSIG = 1


def set_title(role: str) -> None:
    if _setproctitle is not None:
        _setproctitle.setproctitle(f"echod: {role}")


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Backstop for the master-alive pipe: the kernel kills us if the master dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        pass
