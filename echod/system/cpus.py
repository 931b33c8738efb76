"""How many workers echod starts when the config does not say: the CPUs it may use.

``os.cpu_count()`` is the host's: 64 on a 64-core node, although a pod's CPU
quota may pay for one. So: the CPUs echod may run on (its affinity: taskset,
cpusets), capped by the tightest CPU quota of its cgroups, rounded up, at
least 1. An explicit ``workers`` always wins. The reason goes into the log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from echod.system.cgroups import CgroupView, cpus_for_quota, tightest_cpu_quota


@dataclass(frozen=True)
class WorkerCount:
    count: int
    why: str  # for the start-up line: "N worker(s): <why>"


def worker_count(configured: int, view: CgroupView | None = None) -> WorkerCount:
    """``configured`` > 0 wins; 0 means "from the CPUs this process may use"."""
    if configured > 0:
        return WorkerCount(configured, f"workers = {configured} in the configuration")
    return auto_worker_count(affinity(), os.cpu_count() or 1, view or CgroupView.of_this_process())


def affinity() -> int:
    """CPUs this process may run on (taskset, cpusets); the CPU count where unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        return os.cpu_count() or 1


def auto_worker_count(allowed: int, online: int, view: CgroupView) -> WorkerCount:
    quota = tightest_cpu_quota(view)
    if quota is not None and cpus_for_quota(quota.cpus) < allowed:
        count = cpus_for_quota(quota.cpus)
        return WorkerCount(count, f"{quota.describe()}, {allowed} CPU(s) allowed by affinity")
    if allowed < online:
        return WorkerCount(allowed, f"CPU affinity allows {allowed} of {online} CPU(s)")
    return WorkerCount(max(1, allowed), f"{allowed} CPU(s)")
