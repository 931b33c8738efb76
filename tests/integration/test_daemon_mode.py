"""echod without --foreground: the launcher returns only once the daemon serves."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
from support.echod import child_env, echo_roundtrip, echod_command, free_port, wait_until
from support.faults import boot_fault_env

from echod.pidfile import read_pid


@pytest.fixture
def daemons():
    """Pids of daemons started by a test; killed (with their workers) at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            for child in process.children(recursive=True):
                child.kill()
            process.kill()


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*echod_command(), *args],
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_launcher_returns_once_serving_and_the_daemon_detaches(
    tmp_path: Path, daemons: list[int]
) -> None:
    port = free_port()
    runtime = tmp_path / "run"
    log_file = tmp_path / "echod.log"
    result = launch(
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "--runtime-dir",
        str(runtime),
        "--log-file",
        str(log_file),
    )
    pid = read_pid(runtime / "echod.pid")
    if pid:
        daemons.append(pid)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    # serving already: no retry needed
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert echo_roundtrip(sock, b"daemon") == b"daemon"
    daemon = psutil.Process(pid)
    assert daemon.ppid() != os.getpid(), "still a child of the launcher"
    # double fork: a new session, but not its leader, so no terminal can come back
    assert os.getsid(pid) not in (os.getsid(0), pid)
    assert daemon.terminal() is None
    assert len(daemon.children()) == 2
    assert "ready: 2 worker(s)" in log_file.read_text()
    os.kill(pid, signal.SIGTERM)
    wait_until(
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
        20,
        message="daemon exit",
    )
    assert not (runtime / "echod.pid").exists(), "pidfile removed on a clean stop"


def test_daemon_log_defaults_into_the_runtime_dir_when_not_root(
    tmp_path: Path, daemons: list[int]
) -> None:
    if os.geteuid() == 0:
        pytest.skip("as root the default is /var/log/echod/echod.log")
    runtime = tmp_path / "run"
    result = launch("-w", "1", "-b", "127.0.0.1:0", "--runtime-dir", str(runtime))
    daemons.append(read_pid(runtime / "echod.pid") or 0)
    assert result.returncode == 0, result.stderr
    assert "listening on 127.0.0.1:" in (runtime / "echod.log").read_text()


def test_bind_failure_reaches_the_terminal_with_its_code(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = launch(
            "-b",
            f"127.0.0.1:{port}",
            "--runtime-dir",
            str(tmp_path / "run"),
            "--log-file",
            str(tmp_path / "echod.log"),
        )
    assert result.returncode == 69
    assert "address already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_failure_after_detaching_is_reported_by_the_launcher(
    tmp_path: Path, daemons: list[int]
) -> None:
    runtime = tmp_path / "run"
    result = launch(
        "-b",
        "127.0.0.1:0",
        "--runtime-dir",
        str(runtime),
        "--log-file",
        str(tmp_path / "echod.log"),
        env=boot_fault_env(tmp_path / "faults"),
    )
    assert result.returncode == 1, result.stderr
    assert "stopped before serving" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_second_daemon_fails_naming_the_first(tmp_path: Path, daemons: list[int]) -> None:
    runtime = tmp_path / "run"
    args = [
        "-b",
        "127.0.0.1:0",
        "--runtime-dir",
        str(runtime),
        "--log-file",
        str(tmp_path / "echod.log"),
    ]
    assert launch(*args).returncode == 0
    pid = read_pid(runtime / "echod.pid")
    daemons.append(pid or 0)
    second = launch(*args)
    assert second.returncode == 69
    assert f"pid {pid}" in second.stderr


@pytest.mark.root
def test_privileges_are_dropped_after_binding_a_privileged_port(
    start_echod, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    port = next((p for p in range(700, 1000) if _port_free(p)), None)
    if port is None:
        pytest.skip("no free privileged port")
    # pytest's own temp dirs are 0700: give nobody a runtime dir it can reach
    runtime = Path(tempfile.mkdtemp(prefix="echod-priv-", dir="/tmp"))
    runtime.chmod(0o755)
    server = start_echod(
        "--user",
        "nobody",
        "--group",
        str(nobody.pw_gid),
        "--runtime-dir",
        str(runtime / "run"),
        bind=[f"127.0.0.1:{port}"],
    )
    for pid in [server.pid, *server.worker_pids()]:
        uids = psutil.Process(pid).uids()
        assert (uids.real, uids.effective, uids.saved) == (nobody.pw_uid,) * 3
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert echo_roundtrip(sock, b"unprivileged") == b"unprivileged"
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert not (runtime / "run" / "echod.pid").exists()
    shutil.rmtree(runtime, ignore_errors=True)


def test_user_option_without_root_fails_with_77(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("as root the drop would succeed")
    result = launch("-F", "--user", "nobody", "-b", "127.0.0.1:0", "--runtime-dir", str(tmp_path))
    assert result.returncode == 77, result.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_relative_paths_survive_daemonizing_reload_and_upgrade(
    tmp_path: Path, daemons: list[int]
) -> None:
    """The daemon runs in /, yet `-c echod.toml` given relative must keep working."""
    (tmp_path / "echod.toml").write_text('bind = ["127.0.0.1:0"]\nworkers = 1\n')
    result = subprocess.run(
        [*echod_command(), "-c", "echod.toml", "--runtime-dir", "run", "--log-file", "echod.log"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        cwd=tmp_path,
    )
    pid = read_pid(tmp_path / "run" / "echod.pid")
    daemons.append(pid or 0)
    assert result.returncode == 0, result.stderr
    assert psutil.Process(pid).cwd() == "/"
    os.kill(pid, signal.SIGHUP)
    log = tmp_path / "echod.log"
    wait_until(lambda: "generation 2 serving" in log.read_text(), 20, message="reload")
    os.kill(pid, signal.SIGUSR2)
    wait_until(lambda: "generation 3 serving" in log.read_text(), 30, message="upgrade")
    assert "upgrade aborted" not in log.read_text()
    assert psutil.Process(pid).cwd() == "/"
    assert read_pid(tmp_path / "run" / "echod.pid") == pid
