"""echod's command line: every exit code, one-line errors, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest
from support.echod import child_env, echo_roundtrip, echod_command
from support.paths import ETC


def run_echod(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        echod_command() + list(args),
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_clean_failure(
    result: subprocess.CompletedProcess[str], code: int, *needles: str
) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_version() -> None:
    result = run_echod("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("echod ")


def test_help_exits_zero() -> None:
    result = run_echod("--help")
    assert result.returncode == 0
    assert "--bind" in result.stdout and "USR2" in result.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--no-such-flag"], "unrecognized arguments"),
        (["-b", "nonsense"], "--bind"),
        (["-b", "127.0.0.1:99999"], "out of range"),
        (["-b", "::1:7007"], "brackets"),
        (["-w", "-1"], "--workers"),
        (["-w", "many"], "whole number"),
        (["--log-level", "loud"], "invalid choice"),
    ],
)
def test_bad_command_line_exits_64(args: list[str], needle: str, tmp_path: Path) -> None:
    assert_clean_failure(run_echod("-F", "--runtime-dir", str(tmp_path), *args), 64, needle)


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    result = run_echod("-t", "-c", str(tmp_path / "nope.toml"))
    assert_clean_failure(result, 78, "nope.toml", "not found")


@pytest.mark.parametrize(
    "content,needles",
    [
        ("workers = [", ["invalid TOML"]),
        ("wokers = 4", ["unknown key 'wokers'", "did you mean 'workers'"]),
        ("workers = 'four'", ["workers", "integer"]),
        ("workers = -1", ["workers", "between 0 and"]),
        ("idle_timeout = -1", ["idle_timeout", "0 or greater"]),
        ("bind = ['nowhere']", ["bind"]),
        ("log_format = 'xml'", ["log_format", "text, json"]),
        ("[server]\nworkers = 2", ["[server]"]),
    ],
)
def test_bad_config_exits_78_naming_the_key(
    content: str, needles: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "echod.toml"
    path.write_text(content)
    assert_clean_failure(run_echod("-t", "-c", str(path)), 78, str(path), *needles)


def test_check_config_ok(tmp_path: Path) -> None:
    path = tmp_path / "echod.toml"
    path.write_text('workers = 3\nbind = ["127.0.0.1:7007", "udp://127.0.0.1:7007"]\n')
    result = run_echod("--check-config", "-c", str(path))
    assert result.returncode == 0
    assert result.stdout.strip() == "configuration OK"


def test_shipped_config_is_valid() -> None:
    shipped = ETC / "echod.toml"
    result = run_echod("-t", "-c", str(shipped))
    assert result.returncode == 0, result.stderr


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    path = tmp_path / "echod.toml"
    path.write_text("workers = 3\nbacklog = 77\nidle_timeout = 5\n")
    result = run_echod(
        "--print-config",
        "-w",
        "5",
        env={"ECHOD_CONFIG": str(path), "ECHOD_WORKERS": "4", "ECHOD_IDLE_TIMEOUT": "9"},
    )
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["workers"] == 5  # CLI beats env
    assert effective["idle_timeout"] == 9  # env beats file
    assert effective["backlog"] == 77  # file beats default
    assert effective["max_buffer"] == 262144  # built-in default


def test_unknown_environment_variable_is_a_warning_naming_the_likely_key() -> None:
    result = run_echod("-t", env={"ECHOD_WROKERS": "2"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "configuration OK"
    assert result.stderr == (
        "echod: warning: environment: ignoring unknown variable ECHOD_WROKERS"
        " (did you mean ECHOD_WORKERS?)\n"
    )


# What the kubelet injects into every pod of a namespace with a Service named echod.
KUBERNETES_SERVICE_LINKS = {
    "ECHOD_SERVICE_HOST": "10.96.0.12",
    "ECHOD_SERVICE_PORT": "7",
    "ECHOD_PORT": "tcp://10.96.0.12:7",
    "ECHOD_PORT_7_TCP": "tcp://10.96.0.12:7",
    "ECHOD_PORT_7_TCP_PROTO": "tcp",
    "ECHOD_PORT_7_TCP_PORT": "7",
    "ECHOD_PORT_7_TCP_ADDR": "10.96.0.12",
}


def test_kubernetes_service_links_do_not_stop_a_start(start_echod) -> None:
    result = run_echod("-t", env={**KUBERNETES_SERVICE_LINKS, "ECHOD_WORKERS": "3"})
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()  # one line for all of them
    assert line.startswith("echod: warning: environment: ignoring ")
    assert all(name in line for name in KUBERNETES_SERVICE_LINKS)
    assert "Kubernetes" in line
    effective = tomllib.loads(run_echod("--print-config", env=KUBERNETES_SERVICE_LINKS).stdout)
    assert effective["bind"] == ["127.0.0.1:7007"]  # ECHOD_PORT is not a config key
    server = start_echod(env=KUBERNETES_SERVICE_LINKS)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert echo_roundtrip(sock, b"in a pod") == b"in a pod"


def test_a_bad_value_of_a_known_key_still_exits_78_naming_the_variable() -> None:
    result = run_echod("-t", env={"ECHOD_WORKERS": "many", "ECHOD_SERVICE_HOST": "10.0.0.1"})
    assert_clean_failure(result, 78, "environment", "ECHOD_WORKERS", "many")


def test_address_in_use_exits_69(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_echod("-F", "--runtime-dir", str(tmp_path), "-b", f"127.0.0.1:{port}")
    assert_clean_failure(result, 69, f"127.0.0.1:{port}", "address already in use")


def test_second_instance_exits_69_naming_the_running_pid(start_echod, runtime_dir) -> None:
    first = start_echod()
    result = run_echod("-F", "--runtime-dir", str(runtime_dir), "-b", "127.0.0.1:0")
    assert_clean_failure(result, 69, "already running", f"pid {first.pid}")


def test_stale_pidfile_does_not_block_a_start(start_echod, runtime_dir: Path) -> None:
    (runtime_dir / "echod.pid").write_text("999999\n")  # no process holds its lock
    server = start_echod()
    assert (runtime_dir / "echod.pid").read_text().strip() == str(server.pid)


def test_environment_warnings_are_json_lines_when_the_log_is() -> None:
    """In a container the log collector reads JSON lines: the start-up warnings too."""
    env = {**KUBERNETES_SERVICE_LINKS, "ECHOD_LOG_FORMAT": "json"}
    result = run_echod("-t", env=env)
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "warning"
    assert all(name in record["msg"] for name in KUBERNETES_SERVICE_LINKS)
