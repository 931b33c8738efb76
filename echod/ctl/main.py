"""echoctl: the operator's tool (minimal dispatcher; send/check/bench join it)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from echod import installed_version
from echod.ctl import control, status
from echod.ctl.target import add_location_options
from echod.errors import EchodError

SUBCOMMANDS = (status, control)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(64, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="echoctl", description="Probe and control echod.")
    parser.add_argument("--version", action="version", version=f"echoctl {installed_version()}")
    add_location_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except EchodError as exc:
        print(f"echoctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
