"""The OCI image (make image) run for real with podman, and the Kubernetes example under kube play.

`make image` builds localhost/echod:<version> from the project's .deb
(container/). The container is then run as operators run it: read-only, on
the host's network with ECHOD_BIND/ECHOD_METRICS_BIND on free loopback ports,
and the shipped etc/kubernetes/echod.yaml is played with `podman kube play
--network slirp4netns` (replicas 1 and published loopback ports in the test's
copy: two replicas cannot publish one port). Traffic goes to 127.0.0.1 only.

Needs root, podman, runc, mmdebstrap and slirp4netns; skipped without them,
unless REQUIRE_PODMAN=1 (CI), where that is a failure. Figures (image size,
master RSS, stop time, kube play's output) print with `pytest -rP`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.echod import wait_until
from support.paths import ETC, REPO
from support.podman import (
    exclusive,
    free_tcp_and_udp_port,
    inspect,
    json_log_lines,
    podman,
    require_podman,
)

KUBERNETES = ETC / "kubernetes" / "echod.yaml"
MAKE_IMAGE_TIMEOUT = 900  # a cold cache: mmdebstrap (about a minute) and the image
UID = 10001  # the image's USER (container/Containerfile)
# kube play names the pod after the Deployment and the container after both.
POD = "echod-pod-0"
POD_CONTAINER = "echod-pod-0-echod"
# The ConfigMap's volume and the emptyDir kube play creates: removed after each
# play, so that nothing of the test outlives it in podman's database.
KUBE_VOLUMES = ("echod", "echod-run")
_names = itertools.count()
Played = subprocess.CompletedProcess[str]


def version() -> str:
    """The upstream version of debian/changelog's top entry (the image's tag)."""
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"echod \(([^)-]+)-[^)]+\)", first)
    assert match, first
    return match.group(1)


@pytest.fixture(scope="module")
def image() -> str:
    """`make image`, once per module (and per xdist worker: a warm rebuild is seconds)."""
    require_podman()
    with exclusive():
        started = time.monotonic()
        result = subprocess.run(
            ["make", "--no-print-directory", "image"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=MAKE_IMAGE_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        took = time.monotonic() - started
    output = f"{result.stdout[-8000:]}\n{result.stderr[-8000:]}"
    assert result.returncode == 0, f"make image failed\n{output}"
    tag = f"localhost/echod:{version()}"
    size = int(inspect(tag, "{{.Size}}"))
    print(f"# image: make image took {took:.1f} s; {tag} is {size / 1e6:.1f} MB")
    return tag


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of containers the test started; every one is removed at teardown."""
    names: list[str] = []
    with exclusive():
        yield names
        for name in names:
            podman("rm", "--force", "--time", "0", name, check=False)


def run_container(image: str, names: list[str], *options: str) -> str:
    """`podman run -d` a container named for this test; returns its name."""
    name = f"echod-test-{os.getpid()}-{next(_names)}"
    names.append(name)
    podman("run", "--detach", "--name", name, *options, image)
    return name


def host_run(image: str, names: list[str], *options: str) -> tuple[str, int, int]:
    """The image as an operator runs it: read-only, host network, free loopback ports."""
    echo, metrics = free_tcp_and_udp_port(), free_tcp_and_udp_port()
    name = run_container(
        image,
        names,
        "--read-only",
        "--network=host",
        "--env",
        f"ECHOD_BIND=127.0.0.1:{echo},udp://127.0.0.1:{echo}",
        "--env",
        f"ECHOD_METRICS_BIND=127.0.0.1:{metrics}",
        *options,
    )
    wait_until(lambda: http_status(metrics, "/readyz") == 200, 30, 0.1, f"{name} ready")
    return name, echo, metrics


def http_status(port: int, path: str) -> int | None:
    """The status of GET http://127.0.0.1:PORT/PATH, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def tcp_echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def udp_echo(port: int, payload: bytes) -> bytes:
    """One datagram and its answer (retried: slirp4netns may drop the first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        for _ in range(5):
            sock.sendto(payload, ("127.0.0.1", port))
            try:
                return sock.recv(65536)
            except TimeoutError:
                continue
    return b""


def host_pid(name: str) -> int:
    return int(inspect(name, "{{.State.Pid}}"))


def uids_of_tree(pid: int) -> dict[int, int]:
    """pid -> real uid of a process and its children, from /proc."""
    uids = {}
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    for each in pids:
        status = Path(f"/proc/{each}/status").read_text()
        match = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
        assert match, status
        uids[each] = int(match.group(1))
    return uids


def rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match
    return int(match.group(1))


# ------------------------------------------------------------ the image alone --


def test_image_is_built_as_the_spec_says(image: str) -> None:
    config = json.loads(inspect(image, "{{json .Config}}"))
    assert config["User"] == f"{UID}:{UID}"
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert config["Entrypoint"] == ["/usr/bin/echod"]
    assert set(config["ExposedPorts"]) == {"7007/tcp", "7007/udp", "9707/tcp"}
    # --format docker keeps it (the OCI format drops it with a warning only)
    healthcheck = json.loads(inspect(image, "{{json .HealthCheck}}"))
    assert healthcheck["Test"] == ["CMD", "/usr/local/bin/echod-healthcheck"], healthcheck
    # the shipped example runs this very image
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERNETES.read_text())}
    [container] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image


def test_container_serves_read_only_as_non_root(image: str, containers: list[str]) -> None:
    name, echo, metrics = host_run(image, containers)
    assert tcp_echo(echo, b"hello\x00echo\n" * 1000) == b"hello\x00echo\n" * 1000
    assert udp_echo(echo, b"datagram\x00") == b"datagram\x00"
    assert http_status(metrics, "/healthz") == 200
    assert http_status(metrics, "/readyz") == 200
    # the master, its workers and the metrics process: none is root
    uids = uids_of_tree(host_pid(name))
    assert len(uids) >= 3 and set(uids.values()) == {UID}, uids
    assert inspect(name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    records = json_log_lines(name)
    assert any("ready" in str(record.get("msg")) for record in records), records
    assert all({"ts", "level", "msg"} <= record.keys() for record in records), records
    # podman runs no periodic checks without systemd, but runs one on demand
    podman("healthcheck", "run", name)
    assert inspect(name, "{{.State.Health.Status}}") == "healthy"


def test_podman_stop_exits_0_at_once(image: str, containers: list[str]) -> None:
    name, echo, _ = host_run(image, containers)
    assert tcp_echo(echo, b"x") == b"x"
    started = time.monotonic()
    podman("stop", name)  # TERM, then SIGKILL after 10 s
    took = time.monotonic() - started
    exit_code = int(inspect(name, "{{.State.ExitCode}}"))
    print(f"# podman stop: {took:.2f} s, exit code {exit_code}")
    assert exit_code == 0  # 137 would be podman's SIGKILL
    assert took < 8, took  # the image's graceful_timeout; with no client it is at once
    assert json_log_lines(name)[-1]["msg"] == "echod stopped"


def test_podman_stop_with_a_client_holding_on_exits_0_before_podman_kills(
    image: str, containers: list[str]
) -> None:
    """A client that never closes: echod closes it after graceful_timeout (8 s in the
    image) and exits 0, before podman's SIGKILL (10 s after TERM)."""
    name, echo, _ = host_run(image, containers)
    with socket.create_connection(("127.0.0.1", echo), timeout=30) as held:
        held.sendall(b"still here")
        assert held.recv(100) == b"still here"
        started = time.monotonic()
        podman("stop", name)
        took = time.monotonic() - started
        closed = held.recv(100)
    exit_code = int(inspect(name, "{{.State.ExitCode}}"))
    print(f"# podman stop, one client holding on: {took:.2f} s, exit code {exit_code}")
    assert closed == b""  # closed by echod, not reset by a kill
    assert exit_code == 0
    assert 6 < took < 10, took


def test_master_memory_does_not_grow_with_the_descriptor_limit(
    image: str, containers: list[str], tmp_path: Path
) -> None:
    """A container's nofile is often 1048576: the master must not pay for it (python-daemon
    2.3 builds a set of every possible descriptor at import; echod imports it only to
    daemonize). The host's hard limit is lower and raising it needs a privilege, so
    getrlimit is faked in the container's python3 (sitecustomize), as the package test does.
    """
    rss = {}
    for limit in (65536, 1048576):
        site = tmp_path / str(limit)
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            "import resource\n_real = resource.getrlimit\n"
            f"resource.getrlimit = lambda which: ({limit}, {limit}) "
            "if which == resource.RLIMIT_NOFILE else _real(which)\n"
        )
        site.chmod(0o755)
        name, _, _ = host_run(
            image, containers, "--volume", f"{site}:/measure:ro", "--env", "PYTHONPATH=/measure"
        )
        rss[limit] = rss_kib(host_pid(name))
        podman("rm", "--force", name)
    print(f"# measure: master RSS in the container, by descriptor limit (KiB): {rss}")
    assert rss[1048576] < rss[65536] + 8192, rss


# ---------------------------------------------------- the Kubernetes example --


def kube_copy(
    directory: Path, echo: int, metrics: int, env: dict[str, str] | None, cpu: str | None
) -> Path:
    """The shipped YAML with one replica and its ports published on loopback (and
    ``env`` added, ``cpu`` as the CPU limit, when given)."""
    docs = list(yaml.safe_load_all(KUBERNETES.read_text()))
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        doc["spec"]["replicas"] = 1
        [container] = doc["spec"]["template"]["spec"]["containers"]
        for port in container["ports"]:
            port["hostIP"] = "127.0.0.1"
            port["hostPort"] = metrics if port["containerPort"] == 9707 else echo
        if env:
            container["env"] = [{"name": key, "value": value} for key, value in env.items()]
        if cpu:
            container["resources"]["limits"]["cpu"] = cpu
    path = directory / "echod.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def remove_kube_leftovers() -> None:
    podman("pod", "rm", "--force", POD, check=False)
    podman("volume", "rm", "--force", *KUBE_VOLUMES, check=False)


@pytest.fixture
def kube_play(image: str, tmp_path: Path) -> Iterator[Callable[..., tuple[Any, int, int]]]:
    """Play a copy of the shipped YAML (kube down and cleanup at teardown)."""
    played: list[Path] = []

    def play(env: dict[str, str] | None = None, cpu: str | None = None) -> tuple[Played, int, int]:
        echo, metrics = free_tcp_and_udp_port(), free_tcp_and_udp_port()
        path = kube_copy(tmp_path, echo, metrics, env, cpu)
        played.append(path)
        result = podman("kube", "play", "--network", "slirp4netns", str(path))
        wait_until(lambda: http_status(metrics, "/readyz") == 200, 30, 0.1, "the pod ready")
        return result, echo, metrics

    with exclusive():
        remove_kube_leftovers()
        try:
            yield play
        finally:
            for path in played:
                podman("kube", "down", str(path), check=False)
            remove_kube_leftovers()


def test_kube_play_of_the_shipped_example(kube_play: Callable[..., Any]) -> None:
    result, echo, metrics = kube_play()
    print(f"# kube play:\n{result.stdout}{result.stderr}")
    assert tcp_echo(echo, b"through slirp4netns\n") == b"through slirp4netns\n"
    assert udp_echo(echo, b"udp too") == b"udp too"
    assert http_status(metrics, "/readyz") == 200
    assert http_status(metrics, "/healthz") == 200
    # the securityContext took: read-only root, no capability, seccomp, not root
    assert inspect(POD_CONTAINER, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    status = Path(f"/proc/{host_pid(POD_CONTAINER)}/status").read_text()
    assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE), status
    assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), status
    assert set(uids_of_tree(host_pid(POD_CONTAINER)).values()) == {UID}
    # workers unset: one per CPU of the limit ("2"), which the quota carries
    assert inspect(POD_CONTAINER, "{{.HostConfig.CpuQuota}}") == "200000"
    assert worker_count_line(POD_CONTAINER).startswith("2 worker(s)")
    # podman 4.3's kube down kills at once (SIGKILL: podman issue 22397, fixed in 5.1);
    # pod stop sends the stop signal and waits, as the kubelet does
    started = time.monotonic()
    podman("pod", "stop", POD)
    took = time.monotonic() - started
    exit_code = int(inspect(POD_CONTAINER, "{{.State.ExitCode}}"))
    print(f"# podman pod stop: {took:.2f} s (shutdown_delay 5 s), echod exit code {exit_code}")
    assert exit_code == 0
    down = podman("kube", "down", str(Path(result.args[-1])))
    print(f"# kube down:\n{down.stdout}")
    assert podman("pod", "exists", POD, check=False).returncode == 1


def worker_count_line(name: str) -> str:
    """echod's start-up line saying how many workers and why."""
    lines = [str(r["msg"]) for r in json_log_lines(name) if " worker(s): " in str(r["msg"])]
    assert lines, name
    return lines[0]


def test_kube_service_links_are_warnings(kube_play: Callable[..., Any]) -> None:
    """A namespace with a Service named echod gives every pod ECHOD_SERVICE_HOST, ECHOD_PORT, ...
    This pod also has a 1-CPU limit: its quota caps the host's CPUs to 1 worker."""
    links = {
        "ECHOD_SERVICE_HOST": "10.96.0.10",
        "ECHOD_SERVICE_PORT": "7",
        "ECHOD_PORT": "tcp://10.96.0.10:7",
        "ECHOD_PORT_7_TCP_ADDR": "10.96.0.10",
    }
    _, echo, _ = kube_play(links, cpu="1")
    assert tcp_echo(echo, b"linked") == b"linked"
    count = worker_count_line(POD_CONTAINER)
    assert count.startswith("1 worker(s)") and "quota" in count, count
    warnings = [r["msg"] for r in json_log_lines(POD_CONTAINER) if r["level"] == "warning"]
    named = [
        msg for msg in map(str, warnings) if "ECHOD_SERVICE_HOST" in msg and "ECHOD_PORT" in msg
    ]
    assert named, warnings
