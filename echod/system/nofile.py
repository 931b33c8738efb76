"""Raising the soft open-file limit before the workers fork.

A shell's default soft limit is often 1024 while the hard limit is far higher
and ``max_connections`` defaults to 10000: a worker would stall at about a
thousand clients. Each worker is its own process with its own descriptors, so
each needs ``max_connections`` plus its own few (listeners, epoll, scoreboard,
pipes, logs). The master raises its soft limit as far as that needs, up to the
hard limit, before forking, and the workers inherit it (as nginx's
``worker_rlimit_nofile`` does, without a knob). It never lowers a limit.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

# Descriptors a worker opens beyond its clients: epoll, timers, UDP sockets, the
# access log, a stack dump... on top of what it inherits from the master.
RESERVE = 64
UNLIMITED = 1 << 62  # stands for RLIM_INFINITY in comparisons


@dataclass(frozen=True)
class NofilePlan:
    """What the limit was, what echod wants and what it got."""

    soft: int  # before
    hard: int
    wanted: int
    granted: int  # the soft limit from now on
    own: int  # descriptors a worker needs besides its connections

    @property
    def fits(self) -> bool:
        return self.granted >= self.wanted

    @property
    def per_worker(self) -> int:
        """Connections one worker can hold under ``granted``."""
        return max(0, self.granted - self.own)


def plan(max_connections: int, open_now: int, soft: int, hard: int) -> NofilePlan:
    """Pure: the soft limit to set. RLIM_INFINITY (-1 in Python) counts as unlimited."""
    soft, hard = _finite(soft), _finite(hard)
    own = open_now + RESERVE
    wanted = max_connections + own
    return NofilePlan(soft, hard, wanted, max(soft, min(wanted, hard)), own)


def _finite(limit: int) -> int:
    return UNLIMITED if limit == resource.RLIM_INFINITY else limit


def open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the listing's own
    except OSError:  # pragma: no cover - no /proc
        return 16


def raise_nofile(max_connections: int) -> NofilePlan:
    """Raise the soft RLIMIT_NOFILE for ``max_connections`` per worker, up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    result = plan(max_connections, open_descriptors(), soft, hard)
    if result.granted > result.soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (result.granted, hard))
        except (OSError, ValueError):  # a seccomp filter or an odd kernel cap (nr_open)
            return NofilePlan(result.soft, result.hard, result.wanted, result.soft, result.own)
    return result
