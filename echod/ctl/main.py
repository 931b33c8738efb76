"""`echoctl`: the operator's tool. Dispatches to one module per subcommand.

A subcommand module exposes `add_parser(subparsers) -> ArgumentParser` and
`run(args) -> int`; adding one is one line in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Protocol, cast

from echod import exitcodes, installed_version
from echod.ctl import bench, check, control, options, send, status
from echod.errors import EchodError

INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

SUBCOMMANDS: tuple[ModuleType, ...] = (
    send,
    check,
    bench,
    status,
    control,  # several verbs: reload, stop, scale, reopen-logs, upgrade
)

EPILOG = """\
Global options may come before or after the subcommand; the last one wins.
Run 'echoctl COMMAND --help' for a command's options and examples.

examples:
  echoctl send -c 3                       probe 127.0.0.1:7007 three times
  echoctl check -H 127.0.0.1 -p 7007      a Nagios/Icinga check
  echoctl bench -c 50 -d 10 -P 2          load test with 50 connections
  echoctl status                          the running master and its workers
  echoctl reload                          HUP, and wait for the new workers
"""


class Subcommand(Protocol):
    def add_parser(
        self, subparsers: argparse._SubParsersAction[Any]
    ) -> argparse.ArgumentParser: ...

    def run(self, args: argparse.Namespace) -> int: ...


def build_parser() -> options.CtlArgumentParser:
    parser = options.CtlArgumentParser(
        prog="echoctl",
        description="Probe, check, load-test and control echod and other echo servers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    options.add_global_options(parser)
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", required=True
    )
    for module in SUBCOMMANDS:
        for subparser, run in _commands_of(module, subparsers):
            options.add_global_options(subparser)
            subparser.set_defaults(run_command=run, command_parser=subparser)
    return parser


def _commands_of(
    module: ModuleType,
    subparsers: argparse._SubParsersAction[Any],
) -> list[tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]]:
    """A module adds one subcommand (add_parser + run) or several (add_parsers)."""
    if hasattr(module, "add_parsers"):
        return list(module.add_parsers(subparsers))
    command = cast(Subcommand, module)
    return [(command.add_parser(subparsers), command.run)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:
        # Blame the subcommand's parser so its own usage conventions apply
        # (check exits 3, not 64).
        args.command_parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
    args.runtime_dir = getattr(args, "runtime_dir", None)
    args.pidfile = getattr(args, "pidfile", None)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exc:  # --help, --version and usage errors
            return exc.code if isinstance(exc.code, int) else exitcodes.USAGE
        run_command: Callable[[argparse.Namespace], int] = args.run_command
        return run_command(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, and keep the
        # interpreter from complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return exitcodes.FAILURE
    except EchodError as exc:
        print(f"echoctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"echoctl: {exc.strerror or exc}{where}", file=sys.stderr)
        return exitcodes.FAILURE


if __name__ == "__main__":
    sys.exit(main())
