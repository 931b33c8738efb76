"""Config and address parsing: pure logic, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from echod.addresses import Address, Transport, parse_address
from echod.config import Config, load_config
from echod.errors import ConfigError


def test_defaults_match_the_spec() -> None:
    config = load_config(environ={})
    assert config.bind == ("127.0.0.1:7007",)
    assert (config.backlog, config.max_connections, config.max_buffer) == (1024, 10000, 262144)
    assert (config.idle_timeout, config.graceful_timeout, config.worker_timeout) == (300, 30, 30)
    assert config.workers == 0  # unset: sized from the CPUs echod may use (echod.system.cpus)


def test_file_env_cli_layers(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('bind = ["127.0.0.1:1"]\nworkers = 2\nbacklog = 10\n')
    config = load_config(str(path), {"workers": 8}, {"ECHOD_BACKLOG": "20"})
    assert (config.bind, config.workers, config.backlog) == (("127.0.0.1:1",), 8, 20)


def test_env_config_path_is_used_when_no_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("workers = 6\n")
    assert load_config(None, {}, {"ECHOD_CONFIG": str(path)}).workers == 6


def test_env_bind_is_a_comma_list() -> None:
    config = load_config(None, {}, {"ECHOD_BIND": "127.0.0.1:1, unix:/tmp/x.sock"})
    assert config.bind == ("127.0.0.1:1", "unix:/tmp/x.sock")


@pytest.mark.parametrize(
    "values,needle",
    [
        ({"workers": True}, "integer"),
        ({"max_buffer": 10}, "between"),
        ({"graceful_timeout": "soon"}, "number of seconds"),
        ({"bind": []}, "at least one"),
        ({"idle_timout": 3}, "did you mean 'idle_timeout'"),
        ({"max_connections_per_child_jitter": 5}, "needs max_connections_per_child"),
    ],
)
def test_invalid_values_name_the_key(values: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, values, {})


def test_to_toml_round_trips() -> None:
    import tomllib

    config = load_config(None, {"workers": 3, "bind": ["[::1]:9", "udp://127.0.0.1:7"]}, {})
    parsed = tomllib.loads(config.to_toml())
    assert load_config(None, parsed, {}) == config


def test_pidfile_defaults_into_runtime_dir() -> None:
    config = Config(runtime_dir="/run/x")
    assert config.pidfile_path == "/run/x/echod.pid"
    assert Config(runtime_dir="/run/x", pidfile="/tmp/p.pid").pidfile_path == "/tmp/p.pid"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:7007", Address(Transport.TCP, host="127.0.0.1", port=7007)),
        ("localhost:0", Address(Transport.TCP, host="localhost", port=0)),
        ("[::1]:7", Address(Transport.TCP, host="::1", port=7)),
        ("tcp://127.0.0.1:1", Address(Transport.TCP, host="127.0.0.1", port=1)),
        ("udp://127.0.0.1:7", Address(Transport.UDP, host="127.0.0.1", port=7)),
        ("udp://[::1]:7", Address(Transport.UDP, host="::1", port=7)),
        ("unix:/run/echod.sock", Address(Transport.UNIX, path="/run/echod.sock")),
        ("fd://3", Address(Transport.FD, fd=3)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "7007",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:x",
        "127.0.0.1:65536",
        "::1:7",
        "[::1]7",
        "[nothex]:7",
        "unix:",
        "fd://x",
        ":7007",
        "unix:" + "a" * 200,
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535), st.booleans())
def test_address_str_round_trips(ip, port: int, udp: bool) -> None:
    host = str(ip)
    text = f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}"
    if udp:
        text = "udp://" + text
    address = parse_address(text)
    assert str(address) == text
    assert parse_address(str(address)) == address


@given(st.text(max_size=40))
def test_parse_address_never_crashes(text: str) -> None:
    try:
        parse_address(text)
    except ValueError:
        pass


def test_udp_receive_buffer_defaults_to_one_mebibyte_and_takes_the_environment() -> None:
    assert load_config(environ={}).udp_receive_buffer == 1 << 20
    environ = {"ECHOD_UDP_RECEIVE_BUFFER": "65536"}
    assert load_config(None, {}, environ).udp_receive_buffer == 65536
    assert load_config(None, {"udp_receive_buffer": 0}, {}).udp_receive_buffer == 0


@pytest.mark.parametrize("size", [1, 4095, (1 << 30) + 1, -1])
def test_udp_receive_buffer_is_0_or_a_sane_size(size: int) -> None:
    with pytest.raises(
        ConfigError, match=r"udp_receive_buffer.*must be 0 \(the kernel's default\)"
    ):
        load_config(None, {"udp_receive_buffer": size}, {})


@pytest.mark.parametrize("text", ["lots", "1.5", "1MiB"])
def test_a_bad_udp_receive_buffer_in_the_environment_names_the_variable(text: str) -> None:
    with pytest.raises(
        ConfigError, match="environment: ECHOD_UDP_RECEIVE_BUFFER must be an integer"
    ):
        load_config(None, {}, {"ECHOD_UDP_RECEIVE_BUFFER": text})


@pytest.mark.parametrize(
    ("variable", "text", "problem"),
    [
        ("ECHOD_WORKERS", "many", " must be an integer, not 'many'"),
        ("ECHOD_WORKERS", "513", ": must be between 0 and 512"),
        ("ECHOD_GRACEFUL_TIMEOUT", "soon", " must be a number of seconds"),
        ("ECHOD_LOG_LEVEL", "loud", ": must be one of"),
    ],
)
def test_an_environment_error_names_the_variable_not_only_the_key(
    variable: str, text: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {}, {variable: text})
    assert str(caught.value).startswith(f"environment: {variable}{problem}"), caught.value


def test_a_config_file_error_still_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "echod.toml"
    path.write_text('workers = "many"\n')
    with pytest.raises(ConfigError, match=r"echod.toml: workers must be an integer"):
        load_config(str(path), {}, {})


@pytest.mark.parametrize("delay", [3600.5, 86400, -1])
def test_shutdown_delay_is_capped_at_an_hour(delay: float) -> None:
    with pytest.raises(ConfigError, match=r"shutdown_delay.*must be between 0 and 3600") as caught:
        load_config(None, {"shutdown_delay": delay}, {})
    assert caught.value.exit_code == 78


def test_shutdown_delay_of_an_hour_is_accepted() -> None:
    assert load_config(None, {"shutdown_delay": 3600}, {}).shutdown_delay == 3600
