"""`echoctl check`: a Nagios/Icinga plugin built on the same probe engine as `send`."""

from __future__ import annotations

import argparse
import math
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
Any wrong byte in an echo, or no echo at all, is CRITICAL.

units: -w and -c are in MILLISECONDS of average round-trip time (check_tcp's
-w/-c are in seconds: check_tcp -w 0.05 is echoctl check -w 50); -t is in
seconds; --loss-warn/--loss-crit are percentages of probes lost.

thresholds are ranges, as in the monitoring plugin guidelines; a state is
raised when the value is outside the range (or inside it, with @):
  10       outside 0..10, i.e. below 0 or above 10
  10:      below 10
  ~:10     above 10 (~ is minus infinity)
  10:20    outside 10..20
  @10:20   inside 10..20 (both ends included)
Perfdata gives the thresholds in the same syntax, numbers as plain decimals.

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
        type=threshold_range,
        default=ThresholdRange.parse("50"),
        metavar="MS",
        help="WARNING when the average rtt, in milliseconds, is outside this range"
        " (default 50: above 50 ms)",
    )
    parser.add_argument(
        "-c",
        "--critical",
        type=threshold_range,
        default=ThresholdRange.parse("100"),
        metavar="MS",
        help="CRITICAL when the average rtt, in milliseconds, is outside this range"
        " (default 100: above 100 ms)",
    )
    parser.add_argument(
        "-t",
        "--timeout",
        type=options.positive_float,
        default=10.0,
        metavar="SECONDS",
        help="seconds for the whole check (default 10)",
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
        type=threshold_range,
        default=ThresholdRange.parse("20"),
        metavar="PCT",
        help="WARNING when the percentage of probes lost is outside this range"
        " (default 20: above 20%%)",
    )
    parser.add_argument(
        "--loss-crit",
        type=threshold_range,
        default=ThresholdRange.parse("60"),
        metavar="PCT",
        help="CRITICAL when the percentage of probes lost is outside this range"
        " (default 60: above 60%%)",
    )
    return parser


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    print(f"ECHO UNKNOWN - {message}")
    sys.stderr.write(f"Try '{parser.prog} --help' for more information.\n")
    sys.exit(UNKNOWN)


class InvalidRange(ValueError):
    """A threshold that is not in the plugin guidelines' range syntax."""


@dataclass(frozen=True)
class ThresholdRange:
    """A monitoring-plugins threshold: `[@]start:end`, alert outside start..end
    (inside with `@`). `start` defaults to 0, `~` is minus infinity, an empty
    end is plus infinity; a lone number N is 0:N."""

    start: float
    end: float
    inside: bool = False  # the @ form: alert when start <= value <= end

    @classmethod
    def parse(cls, text: str) -> ThresholdRange:
        inside = text.startswith("@")
        body = text[1:] if inside else text
        start_text, colon, end_text = body.partition(":")
        if not colon:
            start_text, end_text = "0", body
        start = -math.inf if start_text == "~" else _range_number(start_text or "0", text)
        end = math.inf if colon and not end_text else _range_number(end_text, text)
        if start > end:
            raise InvalidRange(f"threshold range {text!r}: its start is above its end")
        return cls(start, end, inside)

    def alerts(self, value: float) -> bool:
        within = self.start <= value <= self.end
        return within if self.inside else not within

    def describe(self) -> str:
        """The range as the guidelines write it, with plain decimals (perfdata)."""
        if not self.inside and self.start == 0 and self.end != math.inf:
            return output.plain_number(self.end)
        start = "~" if self.start == -math.inf else output.plain_number(self.start)
        end = "" if self.end == math.inf else output.plain_number(self.end)
        return f"{'@' if self.inside else ''}{start}:{end}"

    def is_upper_limit(self) -> bool:
        """The plain `N` (or `~:N`) form: alert above N only, below never (for
        values, like an rtt or a loss, that are never negative)."""
        return not self.inside and self.start <= 0 and self.end != math.inf

    def explain(self, value_text: str, unit: str) -> str:
        """Why `value_text` alerted: 'rtt > 50 ms', 'loss 50% outside 0:20'..."""
        if self.is_upper_limit():
            return f"{value_text} > {output.plain_number(self.end)}{unit}"
        where = "inside" if self.inside else "outside"
        return f"{value_text} {where} {self.describe().removeprefix('@')}{unit}"


def _range_number(text: str, whole: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise InvalidRange(f"threshold range {whole!r}: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise InvalidRange(f"threshold range {whole!r}: {text!r} is not a finite number")
    return number


def threshold_range(text: str) -> ThresholdRange:
    try:
        return ThresholdRange.parse(text)
    except InvalidRange as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class Thresholds:
    rtt_warn_ms: ThresholdRange
    rtt_crit_ms: ThresholdRange
    loss_warn_pct: ThresholdRange
    loss_crit_pct: ThresholdRange


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
    _check_order(thresholds.rtt_warn_ms, thresholds.rtt_crit_ms, "the rtt warning (-w)", "-c")
    _check_order(thresholds.loss_warn_pct, thresholds.loss_crit_pct, "--loss-warn", "--loss-crit")
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


def _check_order(warning: ThresholdRange, critical: ThresholdRange, name: str, other: str) -> None:
    """Plain upper limits must not be crossed (a warning above the critical one is
    a typo); for general ranges the guidelines leave the order to the operator."""
    if warning.is_upper_limit() and critical.is_upper_limit() and warning.end > critical.end:
        raise UsageError(f"{name} threshold is above the critical one ({other})")


def judge(summary: ProbeSummary, thresholds: Thresholds) -> tuple[int, list[str]]:
    """The worst state the run deserves, and why (empty when OK)."""
    problems: list[tuple[int, str]] = []
    if not summary.anything_answered:
        problems.append((CRITICAL, "no echo"))
    if summary.wrong or summary.faults:
        problems.append((CRITICAL, "wrong bytes echoed"))
    loss = summary.loss_percent
    loss_text = f"loss {output.format_percent(loss)}%"
    if summary.received and thresholds.loss_crit_pct.alerts(loss):
        problems.append((CRITICAL, thresholds.loss_crit_pct.explain(loss_text, "%")))
    elif summary.received and thresholds.loss_warn_pct.alerts(loss):
        problems.append((WARNING, thresholds.loss_warn_pct.explain(loss_text, "%")))
    if summary.rtt is not None:
        avg = summary.rtt.avg_ms
        if thresholds.rtt_crit_ms.alerts(avg):
            problems.append((CRITICAL, thresholds.rtt_crit_ms.explain("rtt", " ms")))
        elif thresholds.rtt_warn_ms.alerts(avg):
            problems.append((WARNING, thresholds.rtt_warn_ms.explain("rtt", " ms")))
    state = max((level for level, _ in problems), default=OK)
    return state, [reason for _, reason in problems]


def perfdata(rtt: RttStats | None, loss_percent: float, thresholds: Thresholds) -> str:
    # 'U' is the plugin guidelines' value for "could not be determined".
    rtt_value = f"{output.format_ms(rtt.avg_ms)}ms" if rtt is not None else "U"
    # format_ms and format_percent are fixed-point: never an exponent.
    return (
        f"rtt={rtt_value};{thresholds.rtt_warn_ms.describe()};"
        f"{thresholds.rtt_crit_ms.describe()};0 "
        f"loss={output.format_percent(loss_percent)}%;"
        f"{thresholds.loss_warn_pct.describe()};{thresholds.loss_crit_pct.describe()}"
    )
