"""launch_daemon(): the launching command exits only with the daemon's verdict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DEADLINE_SECONDS = 30.0

# The launcher: binds a socket first (as echod will), then daemonizes. In the daemon
# it records what it sees in a state file and behaves according to the mode.
LAUNCHER = r"""
import json, os, signal, socket, sys, time
from echod.system.daemonize import launch_daemon
mode, state_path, go_path, _token = sys.argv[1:5]
listener = socket.create_server(("127.0.0.1", 0))
not_preserved = os.open(os.devnull, os.O_RDONLY)
print("launching")  # buffered (stdout is a pipe): must be neither lost nor doubled

reporter = launch_daemon(
    files_preserve=[listener.fileno()],
    umask=0o027,
    working_directory="/nonexistent/echod-test" if mode == "bad-workdir" else "/",
    ready_timeout=1.0 if mode == "silent" else 30.0,
)

def fd_target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None

def wait_for(path, seconds):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)

state = {
    "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "cwd": os.getcwd(),
    "umask": os.umask(0o027), "stdio": [fd_target(fd) for fd in (0, 1, 2)],
    "listener_preserved": listener.getsockname()[1] > 0,
    "others_closed": fd_target(not_preserved) is None,
    "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
    "sigttin_default": signal.getsignal(signal.SIGTTIN) is signal.SIG_DFL,
}
if mode == "die-with-worker":
    worker = os.fork()
    if worker == 0:
        reporter.close()  # what echod's workers do after fork
        time.sleep(120)
        os._exit(0)
    state["worker"] = worker
with open(state_path + ".tmp", "w") as out:
    json.dump(state, out)
os.rename(state_path + ".tmp", state_path)

if mode == "ready":
    wait_for(go_path, 60)
    reporter.ready()
    reporter.ready()  # a second call is harmless
    time.sleep(120)  # "serving" until the test kills it
elif mode == "fail":
    reporter.failed(78, "echod: echod.toml: unknown key 'wrokers'\n(did you mean 'workers'?)")
    os._exit(78)
elif mode in ("die", "die-with-worker"):
    os._exit(3)
elif mode == "silent":
    time.sleep(120)
"""


@dataclass
class Launch:
    process: subprocess.Popen[str]
    state_path: Path
    go_path: Path
    token: str

    def state(self) -> dict[str, Any]:
        """The daemon's state file, once written."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not self.state_path.exists():
            assert time.monotonic() < deadline, "the daemon never wrote its state"
            assert self.process.poll() is None or self.state_path.exists(), (
                "launcher exited before the daemon started: " + self.finish()[2]
            )
            time.sleep(0.02)
        return dict(json.loads(self.state_path.read_text()))

    def finish(self) -> tuple[int, str, str]:
        stdout, stderr = self.process.communicate(timeout=DEADLINE_SECONDS)
        return self.process.returncode, stdout, stderr


def alive(pid: int, token: str) -> bool:
    """Whether pid is still one of our test daemons (not a zombie, not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return token.encode() in cmdline and status.rsplit(")", 1)[1].split()[0] != "Z"


def kill_and_wait(pid: int, token: str) -> None:
    """Daemons are not our children (init reaps them): kill by pid, poll until gone."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while alive(pid, token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"
        time.sleep(0.02)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    launches: list[Launch] = []

    def start(mode: str) -> Launch:
        token = f"echod-test-{uuid.uuid4().hex}"
        state_path, go_path = tmp_path / f"{mode}.json", tmp_path / f"{mode}.go"
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, mode, str(state_path), str(go_path), token],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        launches.append(Launch(process, state_path, go_path, token))
        return launches[-1]

    yield start
    for started in launches:
        if started.process.poll() is None:
            started.process.kill()
        started.process.communicate(timeout=DEADLINE_SECONDS)
        if started.state_path.exists():
            state = json.loads(started.state_path.read_text())
            for pid in (state["pid"], state.get("worker")):
                if pid:
                    kill_and_wait(pid, started.token)


def test_launcher_exits_zero_only_once_the_daemon_is_ready(launch: Any) -> None:
    started = launch("ready")
    state = started.state()
    # The daemon is up but has not said ready: the launcher must still be waiting.
    with pytest.raises(subprocess.TimeoutExpired):
        started.process.wait(timeout=0.3)
    started.go_path.touch()
    code, stdout, stderr = started.finish()
    assert (code, stdout, stderr) == (0, "launching\n", "")
    assert alive(state["pid"], started.token)

    # And it is a proper daemon.
    assert state["ppid"] != started.process.pid
    assert state["sid"] != os.getsid(0)
    assert state["cwd"] == "/"
    assert state["umask"] == 0o027
    assert state["stdio"] == ["/dev/null"] * 3
    assert state["listener_preserved"] is True
    assert state["others_closed"] is True
    assert state["sigterm_default"] is True  # signal_map={}: python-daemon left them alone
    assert state["sigttin_default"] is True


def test_error_record_is_printed_and_its_code_returned(launch: Any) -> None:
    started = launch("fail")
    code, stdout, stderr = started.finish()
    assert code == 78
    assert stdout == "launching\n"
    assert stderr == "echod: echod.toml: unknown key 'wrokers' (did you mean 'workers'?)\n"


def test_daemon_dying_without_a_word(launch: Any) -> None:
    started = launch("die")
    state = started.state()
    code, _, stderr = started.finish()
    assert code == 1
    assert stderr == (
        f"echod: the daemon (pid {state['pid']}) exited before it was ready; see its log\n"
    )


def test_a_worker_holding_no_pipe_does_not_delay_the_verdict(launch: Any) -> None:
    started = launch("die-with-worker")
    state = started.state()
    code, _, stderr = started.finish()  # well before the worker's 120 s sleep ends
    assert code == 1
    assert "exited before it was ready" in stderr
    assert alive(state["worker"], started.token)  # it really was still there


def test_silent_daemon_is_stopped_after_the_timeout(launch: Any) -> None:
    started = launch("silent")
    state = started.state()
    code, _, stderr = started.finish()
    assert code == 1
    assert stderr == (
        f"echod: the daemon (pid {state['pid']}) did not report ready within 1 s; sent it SIGTERM\n"
    )
    deadline = time.monotonic() + DEADLINE_SECONDS
    while alive(state["pid"], started.token):
        assert time.monotonic() < deadline, "the silent daemon survived SIGTERM"
        time.sleep(0.02)


def test_daemonizing_failure_reaches_the_terminal(launch: Any) -> None:
    started = launch("bad-workdir")
    code, stdout, stderr = started.finish()
    assert code == 1
    assert stdout == "launching\n"
    assert stderr.startswith("echod: cannot daemonize: ")
    assert "/nonexistent/echod-test" in stderr
    assert stderr.count("\n") == 1
