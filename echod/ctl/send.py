"""`echoctl send`: probe an echo server the way ping probes a host."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from echod.ctl import options, output
from echod.ctl.payload import DEFAULT_MESSAGE, DEFAULT_SEED, seeded_bytes
from echod.ctl.probe import (
    MAX_UDP_PAYLOAD,
    ProbeEvent,
    ProbeOutcome,
    ProbeResult,
    ProbeSettings,
    ProbeSummary,
    ResolvedTarget,
    Target,
    describe_event,
    iter_probes,
    resolve,
)
from echod.errors import UsageError

NAME = "send"

EPILOG = """\
The payload is MESSAGE, or standard input with '-', or -s SIZE seeded random
bytes; without any of them a short line of text. Every echo is checked byte
for byte. Over UDP each datagram starts with an 8-byte header (b'ECHO' and the
probe's seq) so replies are matched to their probe, and duplicates and late
replies are reported; byte counts and offsets then include that header.

exit status: 0 every probe echoed exactly; 1 some probes failed or came back
wrong; 2 nothing answered at all or could not connect; 64 bad usage.
Ctrl-C stops early and prints the summary so far.

examples:
  echoctl send                                one probe to 127.0.0.1:7007
  echoctl send -c 5 -i 0.2 hello              five probes of 'hello'
  echoctl send -p 7 --udp -c 10 -s 1400       UDP, 1400 random bytes each
  echoctl send -H ::1 -c 3 --connect-each     a new connection per probe
  head -c 1M /dev/urandom | echoctl send -    a 1 MiB payload from stdin
  echoctl send -c 20 -i 0 --json              one JSON document
"""


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        NAME,
        help="probe an echo server like ping, verifying every byte",
        description="Send payloads to an echo server and check each echo byte for byte.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "message",
        nargs="?",
        metavar="MESSAGE",
        help="payload text, or '-' to read the payload bytes from standard input",
    )
    options.add_target_options(parser)
    parser.add_argument("--udp", action="store_true", help="probe over UDP instead of TCP")
    parser.add_argument(
        "-c", "--count", type=options.positive_int, default=1, help="number of probes (default 1)"
    )
    parser.add_argument(
        "-i",
        "--interval",
        type=options.non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="time between probe starts (default 1; no wait after the last)",
    )
    parser.add_argument(
        "-s",
        "--size",
        type=options.byte_size,
        help="send SIZE seeded random bytes instead of MESSAGE (suffix K or M allowed)",
    )
    parser.add_argument(
        "-W",
        "--timeout",
        type=options.positive_float,
        default=2.0,
        metavar="SECONDS",
        help="how long each probe may take, connecting included (default 2)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"seed for -s (default {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--connect-each",
        action="store_true",
        help="TCP: open a new connection for each probe and report the connect time",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON document")
    output.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser


def run(args: argparse.Namespace) -> int:
    payload = payload_from_args(args)
    if args.udp and args.connect_each:
        raise UsageError("--connect-each is for TCP; UDP has no connections")
    if args.udp and len(payload) > MAX_UDP_PAYLOAD:
        raise UsageError(f"a UDP payload can be at most {MAX_UDP_PAYLOAD} bytes")
    resolved = resolve(Target(args.host, args.port, udp=args.udp))
    settings = ProbeSettings(
        payload=payload,
        count=args.count,
        interval_s=args.interval,
        timeout_s=args.timeout,
        connect_each=args.connect_each,
    )
    live_output = not (args.json or args.quiet)
    outcomes: list[ProbeOutcome] = []
    interrupted = False
    try:
        for outcome in iter_probes(resolved, settings):
            outcomes.append(outcome)
            if live_output:
                print(describe_outcome(outcome, resolved.address), flush=True)
    except KeyboardInterrupt:
        # Like ping: Ctrl-C ends the run, the summary still counts.
        interrupted = True
    summary = ProbeSummary.from_outcomes(outcomes, interrupted=interrupted)
    if args.json:
        print(json.dumps(json_report(resolved, settings, outcomes, summary), indent=2))
    else:
        if live_output:
            print()
        print(summary_text(resolved, summary))
    return summary.exit_code


def payload_from_args(args: argparse.Namespace) -> bytes:
    if args.size is not None and args.message is not None:
        raise UsageError("give either MESSAGE or -s SIZE, not both")
    if args.size is not None:
        return seeded_bytes(args.size, args.seed)
    if args.message == "-":
        payload = sys.stdin.buffer.read()
    elif args.message is not None:
        # fsencode gives back the exact bytes of the command line argument.
        payload = os.fsencode(args.message)
    else:
        payload = DEFAULT_MESSAGE
    if not payload:
        raise UsageError("the payload is empty: nothing to echo")
    return payload


def describe_outcome(outcome: ProbeOutcome, address: str) -> str:
    if isinstance(outcome, ProbeEvent):
        return describe_event(outcome, address)
    return describe_result(outcome, address)


def describe_result(result: ProbeResult, address: str) -> str:
    if result.error is not None:
        return f"seq={result.seq}: {result.error}"
    line = f"{result.received_bytes} bytes from {address}: seq={result.seq}"
    if result.connect_ms is not None:
        line += f" connect={output.format_ms(result.connect_ms)} ms"
    if result.rtt_ms is not None:
        line += f" time={output.format_ms(result.rtt_ms)} ms"
    return line


def summary_text(resolved: ResolvedTarget, summary: ProbeSummary) -> str:
    counts = (
        f"{summary.sent} probes sent, {summary.received} received, "
        f"{output.format_percent(summary.loss_percent)}% loss"
    )
    for number, label in (
        (summary.wrong, "wrong"),
        (summary.duplicates, "duplicates"),
        (summary.late, "late"),
        (summary.unexpected, "unexpected"),
    ):
        if number:
            counts += f", {number} {label}"
    lines = [f"--- {resolved.target} echo statistics ---", counts]
    if summary.rtt is not None:
        rtt = summary.rtt
        values = "/".join(
            output.format_ms(v) for v in (rtt.min_ms, rtt.avg_ms, rtt.max_ms, rtt.mdev_ms)
        )
        lines.append(f"rtt min/avg/max/mdev = {values} ms")
    return "\n".join(lines)


def json_report(
    resolved: ResolvedTarget,
    settings: ProbeSettings,
    outcomes: list[ProbeOutcome],
    summary: ProbeSummary,
) -> dict[str, Any]:
    return {
        "target": resolved.to_json(),
        "payload_bytes": len(settings.payload),
        "connect_each": settings.connect_each,
        "probes": [o.to_json() for o in outcomes if isinstance(o, ProbeResult)],
        "events": [o.to_json() for o in outcomes if isinstance(o, ProbeEvent)],
        "summary": summary.to_json(),
    }
