"""``echod``: the server's command line. Parses flags, builds the config, and
starts the master in the foreground or as a daemon.

Every expected failure becomes one line on stderr and a sysexits code; a
traceback reaches the user only for a genuine bug, and then only in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from echod import exitcodes, installed_version
from echod.addresses import parse_address
from echod.config import (
    CONFIG_ENV,
    LOG_FORMATS,
    LOG_LEVELS,
    Config,
    absolute_paths,
    coerce,
    load_config,
)
from echod.errors import ConfigError, EchodError, UsageError
from echod.logs import JsonFormatter

# Read when the master's code starts: `echoctl status` shows it, and an
# in-place upgrade proves it loaded new code by a newer value.
CODE_STARTED = time.time()

log = logging.getLogger("echod")
USAGE = "echod [-F] [-c PATH] [-b ADDR]... [-w N] [options]  (echod --help for all)"

# flag destination -> config key; None means "not given", so lower layers apply
CLI_KEYS = (
    "bind",
    "workers",
    "runtime_dir",
    "pidfile",
    "user",
    "group",
    "log_level",
    "log_file",
    "log_format",
    "access_log",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; sysexits (and our SPEC) say 64."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="echod",
        usage=USAGE,
        description="A pre-fork TCP/UDP echo server (RFC 862).",
        epilog="Signals to the master: TERM graceful stop, INT/QUIT fast stop, HUP reload, "
        "TTIN/TTOU one worker more/less, USR1 reopen logs, USR2 in-place upgrade.",
    )
    add = parser.add_argument
    add(
        "-c",
        "--config",
        metavar="PATH",
        help="TOML config file (default: $ECHOD_CONFIG, else built-in defaults)",
    )
    add(
        "-b",
        "--bind",
        metavar="ADDR",
        action="append",
        help="listen address: HOST:PORT, [V6]:PORT, unix:PATH, udp://HOST:PORT or fd://N "
        "(repeatable; replaces the config's list; default 127.0.0.1:7007)",
    )
    add(
        "-w",
        "--workers",
        metavar="N",
        type=_integer,
        help="worker processes (default: the CPUs echod may use)",
    )
    add(
        "-F",
        "--foreground",
        action="store_true",
        help="stay attached; log to stderr unless --log-file",
    )
    add("--runtime-dir", metavar="DIR", help="pidfile and scoreboard directory")
    add("--pidfile", metavar="PATH", help="pidfile (default: RUNTIME_DIR/echod.pid)")
    add("--user", metavar="USER", help="drop privileges to USER after binding (root only)")
    add("--group", metavar="GROUP", help="drop privileges to GROUP after binding (root only)")
    add("--log-level", choices=LOG_LEVELS, help="least severe level logged (default: info)")
    add("--log-file", metavar="PATH", help="log file (default: stderr in the foreground)")
    add("--log-format", choices=LOG_FORMATS, help="text (logfmt-like) or json (default: text)")
    add("--access-log", metavar="PATH", help='one line per finished connection ("-" = stderr)')
    add(
        "-t",
        "--check-config",
        action="store_true",
        help="validate the configuration, print 'configuration OK' and exit",
    )
    add("--print-config", action="store_true", help="print the effective configuration as TOML")
    add("--version", action="version", version=f"echod {installed_version()}")
    return parser


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


@dataclass(frozen=True)
class ConfigSource:
    """Where the config comes from, kept so that a reload (HUP) can read it again."""

    path: str | None
    cli_overrides: dict[str, Any]

    def load(self) -> Config:
        """Read again on reload: silent about the environment, said once at start."""
        return load_config(self.path, self.cli_overrides)

    def load_first(self) -> Config:
        """The first load says what the environment layer ignores, in the log's format."""
        ignored: list[str] = []
        try:
            config = load_config(self.path, self.cli_overrides, warn=ignored.append)
        except EchodError:
            _warn(ignored, "text")
            raise
        _warn(ignored, config.log_format)
        return config

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConfigSource:
        """Paths made absolute now: a daemon re-reads them later from /."""
        path = args.config or os.environ.get(CONFIG_ENV) or None
        return cls(os.path.abspath(path) if path else None, absolute_paths(cli_overrides(args)))


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given on the command line, checked here so that mistakes exit 64."""
    overrides: dict[str, Any] = {}
    for key in CLI_KEYS:
        value = getattr(args, key)
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "bind":
            for text in value:
                try:
                    parse_address(text)
                except ValueError as exc:
                    raise UsageError(f"{flag}: {exc}") from None
        try:
            overrides[key] = coerce(key, value, flag)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = ConfigSource.from_args(args)
        config = source.load_first()
        if args.print_config:
            sys.stdout.write(config.to_toml())
            return exitcodes.OK
        if args.check_config:
            import echod.server.startup  # noqa: F401  (a pre-flight also proves all the code loads)

            print("configuration OK")
            return exitcodes.OK
        from echod.server.startup import serve  # the heavy part, only when serving

        return serve(config, source.load, foreground=args.foreground, code_started=CODE_STARTED)
    except EchodError as exc:
        _fail(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return exitcodes.OK
    except Exception as exc:  # a bug: one line for the user, the traceback in the log
        log.debug("internal error", exc_info=True)
        sys.stderr.write(f"echod: internal error: {type(exc).__name__}: {exc}\n")
        return exitcodes.FAILURE


def _warn(messages: list[str], log_format: str) -> None:
    """Warnings from before logging is set up, on stderr. With log_format = "json", as
    JSON log records: a container's log collector (Kubernetes' service links warn in
    every pod of a namespace with a Service named echod) expects nothing else."""
    for message in messages:
        if log_format == "json":
            record = logging.LogRecord(log.name, logging.WARNING, __file__, 0, message, None, None)
            sys.stderr.write(JsonFormatter().format(record) + "\n")
        else:
            sys.stderr.write(f"echod: warning: {message}\n")


def _fail(exc: EchodError) -> None:
    message = str(exc)
    if isinstance(exc, UsageError):
        sys.stderr.write(f"usage: {USAGE}\n")
    sys.stderr.write(f"echod: {message}\n")
    sys.stderr.flush()
