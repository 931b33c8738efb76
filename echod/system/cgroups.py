"""Where echod sits in the control groups, and what they allow it.

Pure functions over the text of ``/proc/self/mountinfo`` and ``/proc/self/cgroup``
and a file-system root, so that tests point them at a fake tree. Both cgroup
versions are read, even side by side (a hybrid host mounts v1 controllers and
the v2 unified tree at once): each controller's files are looked for in every
hierarchy that may carry them, and whatever is found counts.

A cgroup's limits hold for everything below it, so a quota is looked for in
echod's own cgroup and in every ancestor that the mount shows (a container sees
only its own part of the tree); the tightest one wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

_UNLIMITED_V1 = 1 << 62  # v1 reports "no limit" as a page-rounded LONG_MAX, ~2**63


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: v1 with its controllers, or the v2 unified one."""

    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: from the mount options; v2: empty (all, per cgroup)
    mount_point: str
    mount_root: str  # which cgroup of the hierarchy is mounted there ("/" unless a container)


def parse_mountinfo(text: str) -> list[Hierarchy]:
    """The cgroup mounts listed in a ``/proc/self/mountinfo``."""
    found = []
    for line in text.splitlines():
        mine, sep, theirs = line.partition(" - ")
        if not sep:
            continue
        fields, extra = mine.split(), theirs.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        fstype, options = extra[0], extra[2].split(",")
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            found.append(Hierarchy(2, frozenset(), mount_point, root))
        elif fstype == "cgroup":
            found.append(Hierarchy(1, frozenset(options), mount_point, root))
    return found


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; the v2 unified path under ""."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


@dataclass(frozen=True)
class CgroupView:
    """The hierarchies and echod's place in them, read once, under ``fsroot``."""

    hierarchies: tuple[Hierarchy, ...]
    membership: dict[str, str]
    fsroot: str = "/"

    @classmethod
    def of_this_process(cls, fsroot: str = "/", pid: str = "self") -> CgroupView:
        """Read from /proc; an unreadable /proc (odd sandboxes) means no cgroups at all."""
        try:
            mountinfo = Path(fsroot, f"proc/{pid}/mountinfo").read_text()
            cgroup = Path(fsroot, f"proc/{pid}/cgroup").read_text()
        except OSError:
            return cls((), {}, fsroot)
        return cls(tuple(parse_mountinfo(mountinfo)), parse_proc_cgroup(cgroup), fsroot)

    def own_dirs(self, controller: str) -> list[Path]:
        """echod's own cgroup directory in every hierarchy that may carry ``controller``.

        The v1 hierarchy with that controller (alone or co-mounted, "cpu,cpuacct")
        and the v2 unified one: whether the controller is on in v2 shows by its
        files being there, so callers just look for them."""
        dirs = []
        for hierarchy in self.hierarchies:
            if hierarchy.version == 1 and controller in hierarchy.controllers:
                path = self.membership.get(controller)
            elif hierarchy.version == 2:
                path = self.membership.get("")
            else:
                continue
            if path is not None:
                dirs.append(self._directory(hierarchy, path))
        return list(dict.fromkeys(dirs))  # the same directory once

    def path_up(self, controller: str) -> list[Path]:
        """Own cgroup directories first, then each ancestor up to its mount point."""
        chain = []
        for own in self.own_dirs(controller):
            top = self._mount_of(own)
            here = own
            while True:
                chain.append(here)
                if here == top or here.parent == here:
                    break
                here = here.parent
        return chain

    def _directory(self, hierarchy: Hierarchy, path: str) -> Path:
        mount = Path(self.fsroot, hierarchy.mount_point.lstrip("/"))
        root = hierarchy.mount_root.rstrip("/")
        inside = ".." not in path.split("/")
        if inside and (path == root or path.startswith(root + "/")):
            relative = path[len(root) :].strip("/")
            return mount / relative if relative else mount
        # our cgroup is outside what is mounted (a cgroup namespace shows "/" or
        # "/../.."): the mount point is the closest we can see
        return mount

    def _mount_of(self, directory: Path) -> Path:
        mounts = [Path(self.fsroot, h.mount_point.lstrip("/")) for h in self.hierarchies]
        best = max(
            (m for m in mounts if directory == m or m in directory.parents),
            key=lambda m: len(m.parts),
            default=directory,
        )
        return best


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


# -- CPU ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuQuota:
    cpus: float  # quota / period: 1.5 = one and a half CPUs' worth of time
    where: Path  # the cgroup directory that sets it

    def describe(self) -> str:
        return f"{self.cpus:g} CPU(s) of quota in {self.where}"


def quota_in(directory: Path) -> float | None:
    """The CPU quota one cgroup directory sets, in CPUs; None when it sets none."""
    v2 = _read(directory / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    quota = _read(directory / "cpu.cfs_quota_us")
    period = _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # v1: -1 = no quota


def tightest_cpu_quota(view: CgroupView) -> CpuQuota | None:
    """The smallest CPU quota from echod's own cgroup up to the visible top."""
    quotas = [
        CpuQuota(cpus, directory)
        for directory in view.path_up("cpu")
        if (cpus := quota_in(directory)) is not None
    ]
    return min(quotas, key=lambda q: q.cpus, default=None)


def cpus_for_quota(cpus: float) -> int:
    """Workers a quota pays for: rounded up (1.5 CPUs keep 2 workers busy), at least 1."""
    return max(1, math.ceil(cpus - 1e-9))


# -- memory ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryState:
    """echod's own memory cgroup: its OOM-kill count, and the figures an OOM log names."""

    directory: Path
    oom_kills: int
    usage: int | None  # bytes now
    peak: int | None  # bytes at most so far (v1 max_usage, v2 memory.peak), if kept
    limit: int | None  # the tightest limit on the way up; None = no limit


def memory_state(view: CgroupView) -> MemoryState | None:
    """None when no memory cgroup with an OOM-kill counter is visible (no controller)."""
    for directory in view.own_dirs("memory"):
        kills = _oom_kills(directory)
        if kills is None:
            continue
        version2 = (directory / "memory.events").exists()
        usage_file, peak_file = (
            ("memory.current", "memory.peak")
            if version2
            else ("memory.usage_in_bytes", "memory.max_usage_in_bytes")
        )
        return MemoryState(
            directory,
            kills,
            _number(directory / usage_file),
            _number(directory / peak_file),
            _tightest_limit(view, directory),
        )
    return None


def _oom_kills(directory: Path) -> int | None:
    """v2 memory.events (hierarchical: kills below count too), v1 memory.oom_control."""
    for name in ("memory.events", "memory.oom_control"):
        text = _read(directory / name)
        if text is None:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def _tightest_limit(view: CgroupView, own: Path) -> int | None:
    limits = [
        limit
        for directory in view.path_up("memory")
        if (directory == own or directory in own.parents)
        for name in ("memory.max", "memory.limit_in_bytes")
        if (limit := _number(directory / name)) is not None and limit < _UNLIMITED_V1
    ]
    return min(limits, default=None)


def _number(path: Path) -> int | None:
    text = _read(path)
    if text is None or not text.isdigit():
        return None  # missing, or v2 "max"
    return int(text)


def human_bytes(count: int | None) -> str:
    if count is None:
        return "unknown"
    if count < 1024:
        return f"{count} B"
    size, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"
