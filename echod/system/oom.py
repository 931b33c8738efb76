"""The kernel's OOM killer: let it take a worker, not the master, and tell when it did.

Workers raise their own ``oom_score_adj`` above the master's (raising needs no
privilege): the master is small, holds the listeners, and its death ends the
service, while a worker is replaced within a second and costs only its own
clients. After a worker dies by SIGKILL that nobody sent, the master compares
its memory cgroup's OOM-kill counter with the last reading: the kernel counts
the kill before it sends the signal, so a higher count means the OOM killer.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field

from echod.system.cgroups import CgroupView, MemoryState, human_bytes, memory_state

# How far above the master a worker puts itself (capped at the kernel's 1000).
# Under the shipped unit the master runs at OOMScoreAdjust=-500 and its workers
# come back to 0, as PostgreSQL's postmaster and backends do.
WORKER_OOM_BOOST = 500
OOM_SCORE_ADJ_MAX = 1000
_PROC_FILE = "/proc/self/oom_score_adj"


def worker_score(master_score: int) -> int:
    return min(OOM_SCORE_ADJ_MAX, master_score + WORKER_OOM_BOOST)


def raise_own_oom_score(path: str = _PROC_FILE) -> None:
    """In a freshly forked child: above the master's score, which it inherited."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as handle:
            inherited = int(handle.read().strip())
        with open(path, "w") as handle:
            handle.write(f"{worker_score(inherited)}\n")


@dataclass
class OomWatch:
    """The master's running tally of its memory cgroup's OOM kills."""

    view: CgroupView = field(default_factory=CgroupView.of_this_process)
    seen: int | None = None  # the counter at the last reading; None: no counter visible

    def __post_init__(self) -> None:
        state = memory_state(self.view)
        self.seen = state.oom_kills if state is not None else None

    def explain(self, status: int) -> str | None:
        """How a child with wait ``status`` died, if the OOM killer killed it."""
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            return None
        state = self.claim_kill()
        return (
            None if state is None else f"was killed by the kernel's OOM killer ({describe(state)})"
        )

    def claim_kill(self) -> MemoryState | None:
        """After an unexplained SIGKILL: the cgroup's state if the OOM killer did it.

        Each kill the counter shows is claimed once, so two workers killed together
        are both told as OOM kills and a third, killed by hand, is not."""
        if self.seen is None:
            return None
        state = memory_state(self.view)
        if state is None or state.oom_kills <= self.seen:
            return None
        self.seen += 1
        return state


def describe(state: MemoryState) -> str:
    peak = f", peak {human_bytes(state.peak)}" if state.peak is not None else ""
    return (
        f"memory cgroup {state.directory}: limit {human_bytes(state.limit)}, "
        f"usage {human_bytes(state.usage)}{peak}"
    )
