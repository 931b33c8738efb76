"""Where echod sits in the cgroups, and what they allow it, over fake cgroupfs trees.

CI has only cgroup v1 controllers to try for real (tests/integration/test_fits_machine.py);
v2, nested quotas, "max", co-mounted controllers and containers' partial mounts
are built here as directories under tmp_path, with the mountinfo and
/proc/self/cgroup texts that describe them.
"""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import pytest

from echod.system import nofile, oom
from echod.system.cgroups import (
    CgroupView,
    cpus_for_quota,
    memory_state,
    parse_mountinfo,
    parse_proc_cgroup,
    tightest_cpu_quota,
)
from echod.system.cpus import auto_worker_count, worker_count

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = """\
9:name=systemd:/system.slice/echod.service
4:memory:/system.slice/echod.service
2:cpu,cpuacct:/system.slice/echod.service
0::/system.slice/echod.service
"""
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def view(root: Path, mountinfo: str, cgroup: str) -> CgroupView:
    write(root, "proc/self/mountinfo", mountinfo)
    write(root, "proc/self/cgroup", cgroup)
    return CgroupView.of_this_process(str(root))


def v1_quota(root: Path, path: str, quota: int, period: int = 100000) -> None:
    base = f"sys/fs/cgroup/cpu,cpuacct{path}"
    write(root, f"{base}/cpu.cfs_quota_us", f"{quota}\n")
    write(root, f"{base}/cpu.cfs_period_us", f"{period}\n")


def test_mountinfo_finds_v1_with_its_controllers_and_the_unified_tree() -> None:
    found = parse_mountinfo(V1_MOUNTINFO)
    assert [(h.version, h.mount_point) for h in found] == [
        (1, "/sys/fs/cgroup/cpu,cpuacct"),
        (1, "/sys/fs/cgroup/memory"),
        (1, "/sys/fs/cgroup/systemd"),
        (2, "/sys/fs/cgroup/unified"),
    ]
    assert {"cpu", "cpuacct"} <= found[0].controllers


def test_mountinfo_unescapes_mount_points() -> None:
    line = r"32 31 0:29 / /sys/fs/my\040cgroups rw - cgroup cgroup rw,cpu" + "\n"
    assert parse_mountinfo(line)[0].mount_point == "/sys/fs/my cgroups"


def test_proc_cgroup_maps_every_controller_and_the_unified_path() -> None:
    paths = parse_proc_cgroup(V1_CGROUP)
    assert paths["cpu"] == paths["cpuacct"] == "/system.slice/echod.service"
    assert paths[""] == "/system.slice/echod.service"
    assert paths["name=systemd"] == "/system.slice/echod.service"


def test_v1_co_mounted_cpu_quota_in_own_cgroup(tmp_path: Path) -> None:
    v1_quota(tmp_path, "/system.slice/echod.service", 150000)
    quota = tightest_cpu_quota(view(tmp_path, V1_MOUNTINFO, V1_CGROUP))
    assert quota is not None and quota.cpus == 1.5
    assert quota.where == tmp_path / "sys/fs/cgroup/cpu,cpuacct/system.slice/echod.service"


def test_v1_no_quota_is_minus_one(tmp_path: Path) -> None:
    v1_quota(tmp_path, "/system.slice/echod.service", -1)
    v1_quota(tmp_path, "/system.slice", -1)
    assert tightest_cpu_quota(view(tmp_path, V1_MOUNTINFO, V1_CGROUP)) is None


def test_the_tightest_quota_on_the_way_up_wins(tmp_path: Path) -> None:
    v1_quota(tmp_path, "/system.slice/echod.service", 400000)  # 4 CPUs here...
    v1_quota(tmp_path, "/system.slice", 50000, period=20000)  # ...2.5 above
    v1_quota(tmp_path, "", -1)  # the root sets none
    quota = tightest_cpu_quota(view(tmp_path, V1_MOUNTINFO, V1_CGROUP))
    assert quota is not None and quota.cpus == 2.5
    assert quota.where.name == "system.slice"


def test_v2_cpu_max_nested_and_max(tmp_path: Path) -> None:
    cgroup = "0::/kubepods/pod1/ctr\n"
    write(tmp_path, "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", "max 100000\n")
    write(tmp_path, "sys/fs/cgroup/kubepods/pod1/cpu.max", "100000 100000\n")
    write(tmp_path, "sys/fs/cgroup/kubepods/cpu.max", "max 100000\n")
    quota = tightest_cpu_quota(view(tmp_path, V2_MOUNTINFO, cgroup))
    assert quota is not None and quota.cpus == 1.0
    assert quota.where == tmp_path / "sys/fs/cgroup/kubepods/pod1"


def test_v2_all_max_is_no_quota(tmp_path: Path) -> None:
    write(tmp_path, "sys/fs/cgroup/a/cpu.max", "max 100000\n")
    assert tightest_cpu_quota(view(tmp_path, V2_MOUNTINFO, "0::/a\n")) is None


def test_a_container_sees_only_its_own_cgroup_mounted(tmp_path: Path) -> None:
    # cgroup namespace: /proc/self/cgroup says "/", the mount root is "/" too and
    # the mount point is the container's own cgroup, with its cpu.max
    write(tmp_path, "sys/fs/cgroup/cpu.max", "200000 100000\n")
    quota = tightest_cpu_quota(view(tmp_path, V2_MOUNTINFO, "0::/\n"))
    assert quota is not None and quota.cpus == 2.0


def test_a_cgroup_outside_the_namespace_falls_back_to_the_mount_point(tmp_path: Path) -> None:
    own = view(tmp_path, V2_MOUNTINFO, "0::/../../other\n")
    assert own.own_dirs("cpu") == [tmp_path / "sys/fs/cgroup"]


def test_a_bind_mounted_subtree_maps_paths_below_its_root(tmp_path: Path) -> None:
    # docker without a cgroup namespace on v1: the mount root is the container's cgroup
    mountinfo = "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "50000\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    write(tmp_path, "sys/fs/cgroup/cpu/inner/cpu.cfs_quota_us", "-1\n")
    write(tmp_path, "sys/fs/cgroup/cpu/inner/cpu.cfs_period_us", "100000\n")
    own = view(tmp_path, mountinfo, "3:cpu:/docker/abc/inner\n")
    assert own.path_up("cpu") == [
        tmp_path / "sys/fs/cgroup/cpu/inner",
        tmp_path / "sys/fs/cgroup/cpu",
    ]
    quota = tightest_cpu_quota(own)
    assert quota is not None and quota.cpus == 0.5


def test_a_hybrid_host_reads_both_trees(tmp_path: Path) -> None:
    # v1 cpu without a quota, and a quota in the unified tree (no cpu controller in
    # v1 on such a host would leave only this one)
    v1_quota(tmp_path, "/system.slice/echod.service", -1)
    write(tmp_path, "sys/fs/cgroup/unified/system.slice/echod.service/cpu.max", "300000 100000")
    quota = tightest_cpu_quota(view(tmp_path, V1_MOUNTINFO, V1_CGROUP))
    assert quota is not None and quota.cpus == 3.0


def test_no_proc_means_no_cgroups(tmp_path: Path) -> None:
    empty = CgroupView.of_this_process(str(tmp_path))
    assert tightest_cpu_quota(empty) is None and memory_state(empty) is None


@pytest.mark.parametrize(
    ("cpus", "workers"), [(0.1, 1), (1.0, 1), (1.01, 2), (1.5, 2), (2.0, 2), (63.2, 64)]
)
def test_a_quota_pays_for_its_cpus_rounded_up_at_least_one(cpus: float, workers: int) -> None:
    assert cpus_for_quota(cpus) == workers


def test_worker_count_affinity_capped_by_quota(tmp_path: Path) -> None:
    v1_quota(tmp_path, "/system.slice/echod.service", 100000)
    own = view(tmp_path, V1_MOUNTINFO, V1_CGROUP)
    count = auto_worker_count(allowed=64, online=64, view=own)
    assert count.count == 1
    assert "1 CPU(s) of quota in" in count.why and "64 CPU(s) allowed" in count.why
    # a quota above the affinity changes nothing: affinity is the tighter one
    v1_quota(tmp_path, "/system.slice/echod.service", 800000)
    count = auto_worker_count(allowed=2, online=64, view=own)
    assert (count.count, count.why) == (2, "CPU affinity allows 2 of 64 CPU(s)")


def test_worker_count_plain_host_and_explicit_value(tmp_path: Path) -> None:
    own = view(tmp_path, V2_MOUNTINFO, "0::/\n")
    assert auto_worker_count(allowed=8, online=8, view=own).why == "8 CPU(s)"
    explicit = worker_count(3, own)
    assert (explicit.count, explicit.why) == (3, "workers = 3 in the configuration")


# -- memory ---------------------------------------------------------------------------
def test_v1_memory_state_reads_the_oom_kill_counter_and_the_tightest_limit(
    tmp_path: Path,
) -> None:
    base = "sys/fs/cgroup/memory/system.slice/echod.service"
    write(
        tmp_path,
        f"{base}/memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )
    write(tmp_path, f"{base}/memory.limit_in_bytes", "9223372036854771712\n")  # none
    write(tmp_path, f"{base}/memory.usage_in_bytes", "1048576\n")
    write(tmp_path, f"{base}/memory.max_usage_in_bytes", "67108864\n")
    write(tmp_path, "sys/fs/cgroup/memory/system.slice/memory.limit_in_bytes", "67108864\n")
    state = memory_state(view(tmp_path, V1_MOUNTINFO, V1_CGROUP))
    assert state is not None
    assert (state.oom_kills, state.usage, state.peak, state.limit) == (
        3,
        1 << 20,
        64 << 20,
        64 << 20,
    )
    assert oom.describe(state).endswith("limit 64.0 MiB, usage 1.0 MiB, peak 64.0 MiB")


def test_v2_memory_events_and_max(tmp_path: Path) -> None:
    base = "sys/fs/cgroup/app"
    write(tmp_path, f"{base}/memory.events", "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n")
    write(tmp_path, f"{base}/memory.max", "max\n")
    write(tmp_path, f"{base}/memory.current", "2048\n")
    write(tmp_path, "sys/fs/cgroup/memory.max", "4096\n")  # a parent's limit holds too
    state = memory_state(view(tmp_path, V2_MOUNTINFO, "0::/app\n"))
    assert state is not None
    assert (state.oom_kills, state.usage, state.peak, state.limit) == (2, 2048, None, 4096)


def test_oom_watch_claims_each_counted_kill_once(tmp_path: Path) -> None:
    events = tmp_path / "sys/fs/cgroup/app/memory.events"
    write(tmp_path, "sys/fs/cgroup/app/memory.events", "oom_kill 5\n")
    watch = oom.OomWatch(view(tmp_path, V2_MOUNTINFO, "0::/app\n"))
    killed = signal.SIGKILL  # a wait status: killed by signal 9
    assert watch.explain(killed) is None  # SIGKILL, but the kernel counted nothing new
    events.write_text("oom_kill 7\n")  # two workers killed at once
    first, second, third = (watch.explain(killed) for _ in range(3))
    assert first and second and "OOM killer" in first
    assert third is None  # a third SIGKILL was someone else's
    events.write_text("oom_kill 8\n")
    assert watch.explain(1 << 8) is None  # exited with code 1: never an OOM kill


def test_no_memory_cgroup_never_claims(tmp_path: Path) -> None:
    watch = oom.OomWatch(view(tmp_path, V2_MOUNTINFO, "0::/\n"))
    assert watch.explain(signal.SIGKILL) is None


# -- oom_score_adj and the descriptor limit -------------------------------------------
@pytest.mark.parametrize(("master", "worker"), [(-1000, -500), (-500, 0), (0, 500), (700, 1000)])
def test_a_worker_scores_above_its_master(tmp_path: Path, master: int, worker: int) -> None:
    score = tmp_path / "oom_score_adj"
    score.write_text(f"{master}\n")
    oom.raise_own_oom_score(str(score))
    assert int(score.read_text()) == worker


INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    ("soft", "hard", "granted", "fits"),
    [
        (1024, 1 << 20, 10000 + 20 + nofile.RESERVE, True),  # raised as far as needed
        (1024, 4096, 4096, False),  # up to the hard limit only
        (1024, INF, 10000 + 20 + nofile.RESERVE, True),
        (50000, 65536, 50000, True),  # never lowered
        (INF, INF, nofile.UNLIMITED, True),  # unlimited already: left alone
    ],
)
def test_the_nofile_plan(soft: int, hard: int, granted: int, fits: bool) -> None:
    plan = nofile.plan(10000, open_now=20, soft=soft, hard=hard)
    assert (plan.granted, plan.fits) == (granted, fits)


def test_the_per_worker_ceiling_under_a_low_hard_limit() -> None:
    plan = nofile.plan(10000, open_now=20, soft=1024, hard=1024)
    assert plan.per_worker == 1024 - 20 - nofile.RESERVE
    assert plan.wanted == 10000 + 20 + nofile.RESERVE
