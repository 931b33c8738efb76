"""``echoctl reload | stop | scale | reopen-logs | upgrade | drain | undrain``: signal
the master (drain: leave a request beside its pidfile, see echod.drainrequest), then
wait (bounded) until the scoreboard shows the effect, and say what happened.

Exit 0 done, 1 failed or timed out, 3 no master runs, 64 bad usage; what went
wrong goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

from echod import drainrequest, exitcodes
from echod.ctl.target import RunningMaster, find_master
from echod.errors import EchodError, PrivilegeError, UsageError
from echod.scoreboard import MasterCounter, State

T = TypeVar("T")
POLL_INTERVAL = 0.05
SERVING_STATES = (State.BOOTING, State.READY, State.RETIRING)


class Timeout(Exception):
    pass


Command = tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]


def add_parsers(subparsers: Any) -> list[Command]:
    commands: list[Command] = []

    def verb(
        name: str,
        help_text: str,
        run: Callable[[argparse.Namespace], int],
        examples: str,
        timeout: float = 60.0,
    ) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(
            name,
            help=help_text,
            description=help_text + ". Exits 0 once the effect is "
            "visible, 1 if it failed or did not show within --timeout, 3 if echod is not "
            "running.",
            epilog="examples:\n" + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=timeout,
            metavar="S",
            help=f"how long to wait for the effect (default {timeout:g} s)",
        )
        commands.append((parser, run))
        return parser

    reload = verb(
        "reload",
        "re-read the configuration (HUP) and replace the workers",
        run_reload,
        "  echoctl reload\n  echoctl reload --no-wait\n",
    )
    reload.add_argument(
        "--wait",
        dest="wait",
        action="store_true",
        default=True,
        help="wait until the new generation serves (the default)",
    )
    reload.add_argument(
        "--no-wait", dest="wait", action="store_false", help="send the signal and return"
    )
    stop = verb(
        "stop",
        "stop echod: graceful (TERM) or --fast (QUIT); --timeout starts after any shutdown_delay",
        run_stop,
        "  echoctl stop\n  echoctl stop --fast\n",
        timeout=120.0,
    )
    stop.add_argument("--fast", action="store_true", help="close connections now")
    scale = verb(
        "scale",
        "set the number of workers (TTIN/TTOU, one at a time)",
        run_scale,
        "  echoctl scale 4\n",
    )
    scale.add_argument("count", type=int, metavar="N", help="workers wanted (1 or more)")
    verb(
        "reopen-logs",
        "reopen log files after logrotate moved them (USR1)",
        run_reopen_logs,
        "  mv echod.log echod.log.1 && echoctl reopen-logs\n",
    )
    verb(
        "upgrade",
        "upgrade in place (USR2): same pid, new code, new workers",
        run_upgrade,
        "  pip install -U echod && echoctl upgrade\n",
        timeout=120.0,
    )
    verb(
        "drain",
        "take echod out of a balancer's rotation: /readyz answers 503, serving goes on",
        run_drain,
        "  echoctl drain && sleep 10 && echoctl stop\n  echoctl drain; echoctl undrain\n",
        timeout=10.0,
    )
    verb(
        "undrain",
        "end a drain: /readyz answers 200 again",
        run_undrain,
        "  echoctl undrain\n",
        timeout=10.0,
    )
    return commands


def _wait(condition: Callable[[], T | None], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise Timeout
        time.sleep(POLL_INTERVAL)


def _fail(message: str) -> int:
    """Say what went wrong on stderr, where errors go and scripts keep stdout clean."""
    print(f"echoctl: {message}", file=sys.stderr)
    return exitcodes.FAILURE


def _signal(master: RunningMaster, signum: signal.Signals) -> None:
    os.kill(master.pid, signum)


def _events(master: RunningMaster) -> tuple[int, ...]:
    return master.scoreboard.master().events


def _current_workers(master: RunningMaster) -> int:
    generation = master.scoreboard.master().generation
    return sum(
        1
        for slot in master.scoreboard.slots()
        if slot.generation == generation and slot.state in SERVING_STATES
    )


def _generation_serving(master: RunningMaster, generation: int) -> int | None:
    """Workers of `generation` once all of them serve and none still boots."""
    slots = [s for s in master.scoreboard.slots() if s.generation == generation]
    if slots and all(s.state in (State.READY, State.RETIRING, State.DRAINING) for s in slots):
        return sum(1 for s in slots if s.state != State.DRAINING)
    return None


def run_reload(args: argparse.Namespace) -> int:
    master = find_master(args)
    before = _events(master)
    _signal(master, signal.SIGHUP)
    if not args.wait:
        print(f"reload requested (HUP sent to pid {master.pid})")
        return exitcodes.OK

    def outcome() -> str | None:
        events = _events(master)
        if events[MasterCounter.RELOADS_FAILED] > before[MasterCounter.RELOADS_FAILED]:
            return "failed"
        if events[MasterCounter.RELOADS_OK] > before[MasterCounter.RELOADS_OK]:
            return "ok"
        return None

    try:
        result = _wait(outcome, args.timeout)
    except Timeout:
        return _fail(f"reload not complete after {args.timeout:g}s (pid {master.pid})")
    if result == "failed":
        return _fail(
            "reload failed: the configuration did not load; the running one "
            "stays in effect (see echod's log)"
        )
    view = master.scoreboard.master()
    print(
        f"reloaded: generation {view.generation} serving with {_current_workers(master)} worker(s)"
    )
    return exitcodes.OK


def run_stop(args: argparse.Namespace) -> int:
    master = find_master(args)
    _signal(master, signal.SIGQUIT if args.fast else signal.SIGTERM)
    if not _wait_for_stop(master, args.timeout):
        return _fail(f"echod (pid {master.pid}) is still stopping after {args.timeout:g}s")
    print(f"stopped echod (pid {master.pid})")
    return exitcodes.OK


def _wait_for_stop(master: RunningMaster, timeout: float) -> bool:
    """True once the master is gone. shutdown_delay does not count against
    `timeout`: while the master shuts down (serving, not ready) the wait runs
    until the delay's end, as the master published it, plus `timeout`."""
    deadline = time.monotonic() + timeout
    extended = False
    while master.alive():
        now = time.monotonic()
        if not extended:
            left = master.scoreboard.master().shutdown_delay_left(now)
            if left > 0:
                extended = True
                deadline = max(deadline, now + left + timeout)
                print(
                    f"echoctl: waiting for the shutdown delay ({left:.0f}s) before stopping",
                    file=sys.stderr,
                )
        if now >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def run_scale(args: argparse.Namespace) -> int:
    if args.count < 1:
        # a usage error: main() prints it to stderr and exits 64
        raise UsageError("scale: N must be 1 or more")
    master = find_master(args)
    try:
        for _ in range(1024):  # bounded: one step per worker added or removed
            current = _current_workers(master)
            if current == args.count:
                break
            # one signal at a time: the kernel merges a signal into one already pending
            _signal(master, signal.SIGTTIN if current < args.count else signal.SIGTTOU)
            _wait(lambda c=current: _current_workers(master) != c, args.timeout)
    except Timeout:
        return _fail(f"scaling stalled at {_current_workers(master)} worker(s)")
    print(f"scaled to {args.count} worker(s)")
    return exitcodes.OK


def run_reopen_logs(args: argparse.Namespace) -> int:
    master = find_master(args)
    _signal(master, signal.SIGUSR1)
    time.sleep(POLL_INTERVAL)
    if not master.alive():
        return _fail(f"echod (pid {master.pid}) died after USR1")
    print(f"log files reopened (USR1 sent to pid {master.pid} and its workers)")
    return exitcodes.OK


def run_upgrade(args: argparse.Namespace) -> int:
    master = find_master(args)
    before = _events(master)
    old_generation = master.scoreboard.master().generation
    _signal(master, signal.SIGUSR2)

    def outcome() -> str | None:
        events = _events(master)
        if events[MasterCounter.UPGRADES_FAILED] > before[MasterCounter.UPGRADES_FAILED]:
            return "failed"
        if events[MasterCounter.UPGRADES_OK] > before[MasterCounter.UPGRADES_OK]:
            return "ok"
        if not master.alive():
            return "died"
        return None

    try:
        result = _wait(outcome, args.timeout)
        if result == "ok":
            _wait(lambda: _generation_serving(master, old_generation + 1), args.timeout)
    except Timeout:
        return _fail(f"upgrade not complete after {args.timeout:g}s (pid {master.pid})")
    if result == "failed":
        return _fail(
            "upgrade aborted: the pre-flight check failed; everything keeps "
            "running as it was (see echod's log)"
        )
    if result == "died":
        return _fail(f"echod (pid {master.pid}) died during the upgrade")
    view = master.scoreboard.master()
    try:
        same_pid = psutil.Process(master.pid).is_running()
    except psutil.Error:
        same_pid = False
    print(
        f"upgraded in place: pid {view.pid}{'' if same_pid else ' (gone?)'}, "
        f"echod {view.version}, generation {view.generation}"
    )
    return exitcodes.OK


def run_drain(args: argparse.Namespace) -> int:
    return _switch_drain(args, drain=True)


def run_undrain(args: argparse.Namespace) -> int:
    return _switch_drain(args, drain=False)


def _switch_drain(args: argparse.Namespace, drain: bool) -> int:
    master = find_master(args)
    path = drainrequest.drain_request_path(master.pidfile)
    try:
        if drain:
            drainrequest.request(path)
        else:
            drainrequest.withdraw(path)
    except OSError as exc:
        what = f"cannot {'create' if drain else 'remove'} the drain request {path}: {exc.strerror}"
        if isinstance(exc, PermissionError):
            raise PrivilegeError(f"{what} (run as root or as echod's user)") from None
        raise EchodError(what) from None
    try:
        _wait(lambda: master.scoreboard.master().draining == drain or None, args.timeout)
    except Timeout:
        return _fail(
            f"echod (pid {master.pid}) did not show the change within {args.timeout:g}s "
            f"(an echod older than drain ignores {path})"
        )
    if drain:
        print(f"draining: /readyz answers 503, echod (pid {master.pid}) serves as before")
    else:
        print(f"ready again: /readyz answers 200 (pid {master.pid})")
    return exitcodes.OK
