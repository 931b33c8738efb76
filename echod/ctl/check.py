"""`echoctl check`: a Nagios/Icinga plugin built on the same probe engine as `send`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from echod.ctl import options, output
from echod.ctl.payload import DEFAULT_MESSAGE, seeded_bytes
from echod.ctl.probe import (
    MAX_UDP_PAYLOAD,
    ProbeEvent,
    ProbeResult,
    ProbeSettings,
    ProbeSummary,
    Target,
    describe_event,
    iter_probes,
    resolve,
)
from echod.ctl.stats import RttStats
from echod.errors import EchodError, UsageError

NAME = "check"

# Nagios plugin return codes.
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

EPILOG = """\
Sends COUNT probes (each may take TIMEOUT/COUNT seconds) and prints one line:
  ECHO OK - 3/3 echoed, rtt avg 0.210 ms | rtt=0.210ms;50;100;0 loss=0%;20;60
A state is raised when the average rtt or the loss is above (>) its threshold.
Any wrong byte in an echo, or no echo at all, is CRITICAL.

exit status (Nagios plugin guidelines): 0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN. Usage errors exit 3 (UNKNOWN) here, not 64 as elsewhere in echoctl,
because a monitoring system reads any other code as a service state.

examples:
  echoctl check -H 127.0.0.1 -p 7007
  echoctl check -H 127.0.0.1 -p 7007 -w 5 -c 20 -n 5 -t 5
  echoctl check -H ::1 -p 7007 --udp --loss-warn 10 --loss-crit 50
"""


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    parser: options.CtlArgumentParser = subparsers.add_parser(
        NAME,
        help="Nagios/Icinga plugin: one status line and perfdata, exit 0-3",
        description="Check an echo server as a Nagios/Icinga plugin.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.usage_error_handler = _usage_error
    options.add_target_options(parser, required=True)
    parser.add_argument(
        "-w",
        "--warning",
        type=options.non_negative_float,
        default=50.0,
        metavar="MS",
        help="average rtt above this many ms is WARNING (default 50)",
    )
    parser.add_argument(
        "-c",
        "--critical",
        type=options.non_negative_float,
        default=100.0,
        metavar="MS",
        help="average rtt above this many ms is CRITICAL (default 100)",
    )
    parser.add_argument(
        "-t",
        "--timeout",
        type=options.positive_float,
        default=10.0,
        metavar="SECONDS",
        help="time for the whole check (default 10)",
    )
    parser.add_argument("--udp", action="store_true", help="check over UDP instead of TCP")
    parser.add_argument(
        "-n", "--count", type=options.positive_int, default=3, help="number of probes (default 3)"
    )
    parser.add_argument(
        "-s", "--size", type=options.byte_size, help="probe with SIZE seeded random bytes"
    )
    parser.add_argument(
        "--loss-warn",
        type=options.percentage,
        default=20.0,
        metavar="PCT",
        help="loss above this percentage is WARNING (default 20)",
    )
    parser.add_argument(
        "--loss-crit",
        type=options.percentage,
        default=60.0,
        metavar="PCT",
        help="loss above this percentage is CRITICAL (default 60)",
    )
    return parser


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    print(f"ECHO UNKNOWN - {message}")
    sys.stderr.write(f"Try '{parser.prog} --help' for more information.\n")
    sys.exit(UNKNOWN)


@dataclass(frozen=True)
class Thresholds:
    rtt_warn_ms: float
    rtt_crit_ms: float
    loss_warn_pct: float
    loss_crit_pct: float


@dataclass(frozen=True)
class CheckResult:
    state: int
    text: str
    perfdata: str

    def line(self) -> str:
        head = f"ECHO {STATE_NAMES[self.state]} - {self.text}"
        return f"{head} | {self.perfdata}" if self.perfdata else head


def run(args: argparse.Namespace) -> int:
    try:
        result = check_echo(
            Target(args.host, args.port, udp=args.udp),
            _payload(args),
            Thresholds(args.warning, args.critical, args.loss_warn, args.loss_crit),
            count=args.count,
            timeout_s=args.timeout,
        )
    except UsageError as exc:
        result = CheckResult(UNKNOWN, str(exc), "")
    except EchodError as exc:  # the host cannot be resolved: the service is down for us
        result = CheckResult(CRITICAL, str(exc), "")
    except Exception as exc:  # a plugin must answer with a state, never a traceback
        result = CheckResult(UNKNOWN, f"internal error: {type(exc).__name__}: {exc}", "")
    print(result.line())
    return result.state


def _payload(args: argparse.Namespace) -> bytes:
    payload = DEFAULT_MESSAGE if args.size is None else seeded_bytes(args.size)
    if args.udp and len(payload) > MAX_UDP_PAYLOAD:
        raise UsageError(f"a UDP payload can be at most {MAX_UDP_PAYLOAD} bytes")
    return payload


def check_echo(
    target: Target, payload: bytes, thresholds: Thresholds, *, count: int, timeout_s: float
) -> CheckResult:
    """Probe `target` `count` times within `timeout_s` and judge the outcome."""
    if thresholds.rtt_warn_ms > thresholds.rtt_crit_ms:
        raise UsageError("the rtt warning threshold (-w) is above the critical one (-c)")
    if thresholds.loss_warn_pct > thresholds.loss_crit_pct:
        raise UsageError("--loss-warn is above --loss-crit")
    resolved = resolve(target)
    settings = ProbeSettings(
        payload=payload, count=count, interval_s=0.0, timeout_s=timeout_s / count
    )
    outcomes = list(iter_probes(resolved, settings))
    summary = ProbeSummary.from_outcomes(outcomes)
    state, problems = judge(summary, thresholds)
    first_failure = next(
        (o for o in outcomes if (isinstance(o, ProbeResult) and not o.ok)), None
    ) or next((o for o in outcomes if isinstance(o, ProbeEvent) and o.fault), None)
    text = f"{summary.received}/{summary.sent} echoed"
    if summary.rtt is not None:
        text += f", rtt avg {output.format_ms(summary.rtt.avg_ms)} ms"
    if problems:
        text += f" ({', '.join(problems)})"
    if isinstance(first_failure, ProbeResult):
        text += f", seq={first_failure.seq}: {first_failure.error}"
    elif isinstance(first_failure, ProbeEvent):
        text += f", {describe_event(first_failure, resolved.address)}"
    return CheckResult(state, text, perfdata(summary.rtt, summary.loss_percent, thresholds))


def judge(summary: ProbeSummary, thresholds: Thresholds) -> tuple[int, list[str]]:
    """The worst state the run deserves, and why (empty when OK)."""
    problems: list[tuple[int, str]] = []
    if not summary.anything_answered:
        problems.append((CRITICAL, "no echo"))
    if summary.wrong or summary.faults:
        problems.append((CRITICAL, "wrong bytes echoed"))
    loss = summary.loss_percent
    loss_text = f"loss {output.format_percent(loss)}%"
    if summary.received and loss > thresholds.loss_crit_pct:
        problems.append((CRITICAL, f"{loss_text} > {thresholds.loss_crit_pct:g}%"))
    elif summary.received and loss > thresholds.loss_warn_pct:
        problems.append((WARNING, f"{loss_text} > {thresholds.loss_warn_pct:g}%"))
    if summary.rtt is not None:
        avg = summary.rtt.avg_ms
        if avg > thresholds.rtt_crit_ms:
            problems.append((CRITICAL, f"rtt > {thresholds.rtt_crit_ms:g} ms"))
        elif avg > thresholds.rtt_warn_ms:
            problems.append((WARNING, f"rtt > {thresholds.rtt_warn_ms:g} ms"))
    state = max((level for level, _ in problems), default=OK)
    return state, [reason for _, reason in problems]


def perfdata(rtt: RttStats | None, loss_percent: float, thresholds: Thresholds) -> str:
    # 'U' is the plugin guidelines' value for "could not be determined".
    rtt_value = f"{rtt.avg_ms:.3f}ms" if rtt is not None else "U"
    return (
        f"rtt={rtt_value};{thresholds.rtt_warn_ms:g};{thresholds.rtt_crit_ms:g};0 "
        f"loss={output.format_percent(loss_percent)}%;"
        f"{thresholds.loss_warn_pct:g};{thresholds.loss_crit_pct:g}"
    )
