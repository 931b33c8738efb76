"""Configuration: built-in defaults < TOML file < ``ECHOD_*`` environment < command line.

Every key is a field of :class:`Config` whose metadata says how to check it, so
the file, the environment and the CLI share one validator, and an error always
names the key (and, for a typo, the key that was probably meant).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from echod.addresses import Address, Transport, parse_address
from echod.cidr import networks_problem
from echod.errors import ConfigError
from echod.scoreboard import MAX_SHUTDOWN_DELAY

CONFIG_ENV = "ECHOD_CONFIG"
ENV_PREFIX = "ECHOD_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
MAX_WORKERS = 512
FOLLOW_GRACEFUL_TIMEOUT = -1.0  # reload_timeout's default: whatever graceful_timeout is


def default_runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/echod"
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"echod-{os.getuid()}")


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def _reload_timeout(value: float) -> str | None:
    if value >= 0 or value == FOLLOW_GRACEFUL_TIMEOUT:
        return None
    follow = f"{FOLLOW_GRACEFUL_TIMEOUT:g}"
    return f"must be 0 (never force) or greater, or {follow} (graceful_timeout's value)"


def _delay_bound(value: float) -> str | None:
    if 0 <= value <= MAX_SHUTDOWN_DELAY:
        return None
    return f"must be between 0 and {MAX_SHUTDOWN_DELAY}"


def _between(low: int, high: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def _receive_buffer(value: int) -> str | None:
    if value == 0 or 4096 <= value <= 1 << 30:
        return None
    return f"must be 0 (the kernel's default) or between 4096 and {1 << 30}"


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _binds(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must list at least one address"
    for text in value:
        try:
            parse_address(text)
        except ValueError as exc:
            return str(exc)
    return None


def _http_bind(value: str) -> str | None:
    """ "" (off) or a TCP HOST:PORT / [V6]:PORT for the metrics endpoint."""
    if not value:
        return None
    try:
        address = parse_address(value)
    except ValueError as exc:
        return str(exc)
    if address.transport is not Transport.TCP:
        return 'must be a TCP HOST:PORT or [V6ADDR]:PORT (or "" for off)'
    return None


def _ports(value: tuple[int, ...]) -> str | None:
    bad = [port for port in value if not 0 <= port <= 65535]
    return f"{bad[0]} is not a port number (0-65535)" if bad else None


def _key(kind: type, check: Callable[[Any], str | None] | None = None, **extra: Any) -> Any:
    """A config field: `kind` is the TOML type (`item`: of a list's items, default str),
    `check` returns an error or None."""
    default = extra.pop("default")
    metadata = {"kind": kind, "check": check, "item": extra.pop("item", str)}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


# absorbs a burst of ~300 datagrams of 1400 bytes (the kernel charges ~2.3 KiB each
# on loopback, more from a NIC) with room to spare; see README, "UDP receive buffer"
DEFAULT_UDP_RECEIVE_BUFFER = 1 << 20


@dataclass(frozen=True)
class Config:
    bind: tuple[str, ...] = _key(list, _binds, default=("127.0.0.1:7007",))
    # 0: from the CPUs echod may use (affinity, cgroup CPU quota; see echod.system.cpus)
    workers: int = _key(int, _between(0, MAX_WORKERS), default=0)
    backlog: int = _key(int, _between(1, 65535), default=1024)
    graceful_timeout: float = _key(float, _non_negative, default=30.0)
    # workers retired by HUP, USR2 and TTOU (graceful_timeout stays the stop's)
    reload_timeout: float = _key(float, _reload_timeout, default=FOLLOW_GRACEFUL_TIMEOUT)
    # closes at a drain's time limit spread over this window (see echod.server.drain)
    close_spread: float = _key(float, _non_negative, default=0.0)
    worker_timeout: float = _key(float, _positive, default=30.0)
    idle_timeout: float = _key(float, _non_negative, default=300.0)
    max_connections: int = _key(int, _between(1, 1_000_000), default=10000)
    max_buffer: int = _key(int, _between(1024, 1 << 30), default=262144)
    max_connections_per_child: int = _key(int, _non_negative, default=0)
    max_connections_per_child_jitter: int = _key(int, _non_negative, default=0)
    max_worker_memory: int = _key(int, _non_negative, default=0)
    runtime_dir: str = _key(str, default=default_runtime_dir)
    pidfile: str = _key(str, default="")
    user: str = _key(str, default="")
    group: str = _key(str, default="")
    umask: int = _key(int, _between(0, 0o777), default=0o022)
    log_level: str = _key(str, _one_of(LOG_LEVELS), default="info")
    log_file: str = _key(str, default="")
    log_format: str = _key(str, _one_of(LOG_FORMATS), default="text")
    access_log: str = _key(str, default="")
    metrics_bind: str = _key(str, _http_bind, default="")
    # abuse resistance (see README, "UDP and abuse resistance")
    allow: tuple[str, ...] = _key(list, networks_problem, default=())
    deny: tuple[str, ...] = _key(list, networks_problem, default=())
    max_connections_per_ip: int = _key(int, _between(0, 65535), default=0)
    max_connections_total: int = _key(int, _between(0, 1 << 31), default=0)
    max_connection_lifetime: float = _key(float, _non_negative, default=0.0)
    udp_deny_source_ports: tuple[int, ...] = _key(list, _ports, item=int, default=())
    udp_rate_per_source: int = _key(int, _between(0, 10_000_000), default=100)
    udp_burst_per_source: int = _key(int, _between(1, 10_000_000), default=200)
    udp_rate_total: int = _key(int, _between(0, 100_000_000), default=10000)
    # SO_RCVBUF of UDP listeners, 0 = the kernel's default (capped at net.core.rmem_max)
    udp_receive_buffer: int = _key(int, _receive_buffer, default=DEFAULT_UDP_RECEIVE_BUFFER)
    # behind a load balancer (see README, "Running behind a load balancer")
    proxy_protocol_from: tuple[str, ...] = _key(list, networks_problem, default=())
    proxy_header_timeout: float = _key(float, _positive, default=3.0)
    # capped: an hour is beyond any balancer's health-check interval, and the
    # scoreboard publishes the delay's end in 16 bits of seconds (see scoreboard.py)
    shutdown_delay: float = _key(float, _delay_bound, default=0.0)
    # TCP_DEFER_ACCEPT on TCP listeners: seconds the kernel holds a connection that
    # has sent nothing before handing it to accept (0 = off); see README, "Performance"
    defer_accept: int = _key(int, _between(0, 3600), default=0)

    @property
    def addresses(self) -> list[Address]:
        return [parse_address(text) for text in self.bind]

    @property
    def reload_limit(self) -> float:
        """Seconds a worker retired by a reload may drain; math.inf: never forced."""
        if self.reload_timeout == FOLLOW_GRACEFUL_TIMEOUT:
            return self.graceful_timeout
        return self.reload_timeout or math.inf

    @property
    def pidfile_path(self) -> str:
        return self.pidfile or os.path.join(self.runtime_dir, "echod.pid")

    def to_toml(self) -> str:
        lines = ["# effective echod configuration"]
        for name, value in asdict(self).items():
            lines.append(f"{name} = {_toml_value(name, value)}")
        return "\n".join(lines) + "\n"


KEYS: dict[str, Any] = {f.name: f for f in fields(Config)}


def suggest_key(name: str) -> str:
    close = difflib.get_close_matches(name, KEYS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _toml_value(name: str, value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(name, item) for item in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if name == "umask":
        return oct(value)
    return repr(value)


def coerce(name: str, value: Any, origin: str, label: str = "") -> Any:
    """Check one key's type and range; return the value in the field's Python type.

    Errors name ``label`` where the value came from somewhere else than a key of
    that name (the environment: ``ECHOD_WORKERS``)."""
    if name not in KEYS:
        raise ConfigError(f"{origin}: unknown key {name!r}{suggest_key(name)}")
    value = _coerce_type(label or name, KEYS[name].metadata, value, origin)
    check = KEYS[name].metadata["check"]
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{origin}: {label or name}: {problem}")
    return value


def _coerce_type(name: str, meta: Mapping[str, Any], value: Any, origin: str) -> Any:
    kind: type = meta["kind"]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{origin}: {name} must be an integer, not {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{origin}: {name} must be a number of seconds, not {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{origin}: {name} must be finite, not {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{origin}: {name} must be a string, not {value!r}")
    elif kind is list and meta["item"] is int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{origin}: {name} must be a list of integers, not {value!r}")
        value = tuple(value)
    elif kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{origin}: {name} must be a list of strings, not {value!r}")
        value = tuple(value)
    return value


def parse_env_value(name: str, text: str) -> Any:
    """Turn an ``ECHOD_*`` string into the TOML-like value ``coerce`` expects."""
    kind = KEYS[name].metadata["kind"]
    try:
        if kind is int:
            return int(text, 0)
        if kind is float:
            return float(text)
    except ValueError:
        return text  # coerce() reports it with the key's name
    if kind is list:
        items = [item for item in (part.strip() for part in text.split(",")) if item]
        if KEYS[name].metadata["item"] is int:
            try:
                return [int(item, 0) for item in items]
            except ValueError:
                return items  # coerce() reports it with the key's name
        return items
    return text


def read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for name, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"{path}: unexpected table [{name}]{suggest_key(name)}; all keys are top level"
            )
    return data


# What the kubelet injects for a Service named "echod": ECHOD_SERVICE_HOST,
# ECHOD_SERVICE_PORT[_NAME], ECHOD_PORT, ECHOD_PORT_7_TCP[_PROTO|_PORT|_ADDR].
_SERVICE_LINK = re.compile(
    r"ECHOD_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)"
)

Warn = Callable[[str], None]


def env_overrides(environ: Mapping[str, str], warn: Warn | None = None) -> dict[str, Any]:
    """The ``ECHOD_<KEY>`` layer. Any other ``ECHOD_*`` variable is ignored with a
    warning, never an error: the kubelet puts service links into every pod of a
    namespace with a Service named ``echod``, and echod must start there."""
    overrides: dict[str, Any] = {}
    unknown: list[str] = []
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name in KEYS:
            overrides[name] = parse_env_value(name, text)
        else:
            unknown.append(var)
    if warn is not None:
        for line in unknown_env_warnings(unknown):
            warn(line)
    return overrides


def unknown_env_warnings(variables: list[str]) -> list[str]:
    """One line per unknown variable, except Kubernetes service links: one line for all."""
    links = [var for var in variables if _SERVICE_LINK.fullmatch(var)]
    lines = []
    for var in variables:
        if var not in links:
            close = difflib.get_close_matches(var[len(ENV_PREFIX) :].lower(), KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""
            lines.append(f"environment: ignoring unknown variable {var}{hint}")
    if links:
        lines.append(
            f"environment: ignoring {', '.join(links)} (Kubernetes service links; "
            "enableServiceLinks: false in the pod spec turns them off)"
        )
    return lines


PATH_KEYS = ("runtime_dir", "pidfile", "log_file", "access_log")


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """A daemon runs in /: relative paths must mean what they meant where it started."""
    for key in PATH_KEYS:
        value = values.get(key)
        if value and value != "-":
            values[key] = os.path.abspath(value)
    if "bind" in values:
        values["bind"] = tuple(
            f"unix:{os.path.abspath(text[5:])}"
            if text.startswith("unix:") and not text.startswith("unix://")
            else text
            for text in values["bind"]
        )
    return values


def load_config(
    config_path: str | None = None,
    cli_overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    warn: Warn | None = None,
) -> Config:
    """Build the effective config; raise ConfigError naming the key and where it came from.

    `warn` hears what is ignored (unknown ``ECHOD_*`` variables), one line each."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get(CONFIG_ENV) or None
    path = os.path.abspath(path) if path else None
    values: dict[str, Any] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path:
        layers.append((path, read_config_file(path)))
    layers.append(("environment", env_overrides(environ, warn)))
    layers.append(("command line", cli_overrides or {}))
    for origin, layer in layers:
        for name, value in layer.items():
            if value is not None:
                label = f"{ENV_PREFIX}{name.upper()}" if origin == "environment" else ""
                values[name] = coerce(name, value, origin, label)
    config = replace(Config(), **absolute_paths(values))
    if config.max_connections_per_child_jitter and not config.max_connections_per_child:
        raise ConfigError("max_connections_per_child_jitter needs max_connections_per_child")
    return config
