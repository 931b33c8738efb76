"""Command-line plumbing shared by every echoctl subcommand.

The parser class, the option value types and the global options live here so
that each subcommand module only declares its own options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from echod import exitcodes

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7007

# Called with (parser, message) on a usage error; must not return.
UsageErrorHandler = Callable[[argparse.ArgumentParser, str], NoReturn]


class CtlArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that exits 64 (EX_USAGE) on a usage error, not argparse's 2.

    Exit 2 means "nothing answered" for echoctl, so argparse's default would lie.
    A subcommand with different conventions (the Nagios plugin `check`) installs
    its own `usage_error_handler`.
    """

    usage_error_handler: UsageErrorHandler | None = None

    def error(self, message: str) -> NoReturn:
        if self.usage_error_handler is not None:
            self.usage_error_handler(self, message)
        # Two lines at most, like echod: what is wrong and where to look.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.stderr.write(f"Try '{self.prog} --help' for more information.\n")
        sys.exit(exitcodes.USAGE)


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """Options that are valid both before and after the subcommand.

    SUPPRESS as the default means an option absent from one parser never
    overwrites the value another parser set, so the last one given wins.
    """
    group = parser.add_argument_group("global options")
    group.add_argument(
        "--runtime-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="where the running echod keeps its pidfile and run-time state",
    )
    group.add_argument(
        "--pidfile",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the running echod's pidfile (overrides --runtime-dir for the pidfile)",
    )


def add_target_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """-H HOST and -p PORT, the address of the echo server to talk to."""
    parser.add_argument(
        "-H",
        "--host",
        required=required,
        default=None if required else DEFAULT_HOST,
        type=host_name,
        help="echo server host name or address"
        + ("" if required else f" (default {DEFAULT_HOST})"),
    )
    parser.add_argument(
        "-p",
        "--port",
        required=required,
        default=None if required else DEFAULT_PORT,
        type=port_number,
        help="echo server port" + ("" if required else f" (default {DEFAULT_PORT})"),
    )


def host_name(text: str) -> str:
    """A host name or address; '[::1]' is accepted as well as '::1'."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        raise argparse.ArgumentTypeError("empty host")
    return text


def port_number(text: str) -> int:
    port = _parse_int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {text!r}")
    return port


def positive_int(text: str) -> int:
    number = _parse_int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return number


def positive_float(text: str) -> float:
    number = _parse_float(text)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text!r}")
    return number


def non_negative_float(text: str) -> float:
    number = _parse_float(text)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text!r}")
    return number


_SIZE_SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def byte_size(text: str) -> int:
    """A positive byte count, optionally with a K or M (binary) suffix: 64, 4K, 1M."""
    multiplier = _SIZE_SUFFIXES.get(text[-1:].lower(), 1)
    digits = text[:-1] if multiplier != 1 else text
    size = _parse_int(digits, shown=text) * multiplier
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, not {text!r}")
    return size


def _parse_int(text: str, *, shown: str | None = None) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {shown or text!r}") from None


def _parse_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return number
