"""``echoctl status --watch``: a live per-worker view redrawn in place, like top.

One scoreboard sample per frame; rates come from the previous sample
(:mod:`echod.ctl.rates`). On a terminal the view takes the alternate screen and
hides the cursor; ``q`` or Ctrl-C leaves (exit 0), SIGTERM exits 143, and the
terminal is put back on every way out. Piped, each frame is a plain timestamped
block (or one JSON line with --json) and no escape codes are written.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from types import FrameType
from typing import TextIO

from echod.ctl import rates
from echod.ctl.output import aligned, human_bytes
from echod.ctl.target import NOT_RUNNING, RunningMaster, find_master

# The first frame needs two samples for rates; this short gap shows them within
# a second instead of a whole --watch interval of dashes.
FIRST_GAP_S = 0.5
TERMINATED = 128 + signal.SIGTERM

ENTER = "\x1b[?1049h\x1b[?25l"  # alternate screen, hide cursor
LEAVE = "\x1b[?25h\x1b[?1049l"
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


class _Terminated(Exception):
    """Raised from the SIGTERM handler so that every finally block runs."""


class _MasterGone(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    master = find_master(args)  # not running: NotRunning, exit 1 or 3 like status
    interactive = sys.stdout.isatty() and not args.json
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if interactive:
            with _screen(sys.stdout):
                _loop(master, args, _TerminalView(sys.stdout))
        else:
            _loop(master, args, _PlainView(sys.stdout, args.json))
    except _Terminated:
        return TERMINATED
    except KeyboardInterrupt:
        return 0
    except _MasterGone:
        # Printed after the screen is restored, so it stays visible.
        print(f"echoctl: echod (pid {master.pid}) is no longer running", file=sys.stderr)
        return NOT_RUNNING
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated


def _loop(master: RunningMaster, args: argparse.Namespace, view: _PlainView) -> None:
    keys = _Keys() if isinstance(view, _TerminalView) else None
    previous = _take(master)
    gap = min(FIRST_GAP_S, args.watch)
    frames = 0
    while args.count is None or frames < args.count:
        if keys is not None and keys.quit_within(gap):
            return
        if keys is None:
            time.sleep(gap)
        current = _take(master)
        view.show(master, args.watch, rates.rates(previous, current))
        previous, gap, frames = current, args.watch, frames + 1


def _take(master: RunningMaster) -> rates.Sample:
    if not master.alive():
        raise _MasterGone
    return rates.sample(master.scoreboard.snapshot(), time.monotonic())


class _PlainView:
    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json

    def show(self, master: RunningMaster, interval: float, rows: list[rates.WorkerRate]) -> None:
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        if self.as_json:
            document = {
                "time": now,
                "master": {"pid": master.pid, "generation": master.scoreboard.master().generation},
                "interval_s": interval,
                "workers": [asdict(row) for row in rows],
                "totals": rates.totals(rows),
            }
            self.out.write(json.dumps(document) + "\n")
        else:
            self.out.write("\n".join([f"--- {now}", *_render(master, interval, rows)]) + "\n\n")
        self.out.flush()


class _TerminalView(_PlainView):
    def __init__(self, out: TextIO) -> None:
        super().__init__(out, as_json=False)

    def show(self, master: RunningMaster, interval: float, rows: list[rates.WorkerRate]) -> None:
        size = shutil.get_terminal_size()
        now = datetime.now().astimezone().strftime("%H:%M:%S")
        lines = [f"{now}  (q to quit)", *_render(master, interval, rows)][: size.lines]
        # Cut to the width: a wrapped line would scroll the screen and break the redraw.
        body = "".join(line[: size.columns] + CLEAR_LINE + "\r\n" for line in lines)
        self.out.write(HOME + body.removesuffix("\r\n") + CLEAR_BELOW)
        self.out.flush()


@contextmanager
def _screen(out: TextIO) -> Iterator[None]:
    """The alternate screen without echo or line buffering; all undone on the way out."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)  # keys one at a time, not echoed; Ctrl-C still interrupts
        out.write(ENTER)
        out.flush()
        yield
    finally:
        out.write(LEAVE)
        out.flush()
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _Keys:
    """Waits for the next frame while watching the keyboard for q."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None

    def quit_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.fd is None:
                time.sleep(left)
                return False
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                key = os.read(self.fd, 1)
                if key in (b"q", b"Q", b""):  # b"": the terminal went away
                    return True
        return False


def _render(master: RunningMaster, interval: float, rows: list[rates.WorkerRate]) -> list[str]:
    view = master.scoreboard.master()
    total = rates.totals(rows)
    lines = [
        f"echod {view.version}: master pid {master.pid}, generation {view.generation}, "
        f"{len(rows)} worker(s), every {interval:g}s",
        f"{total['connections']} open; {_number(total['connections_per_s'])} conn/s, "
        f"{_bytes(total['bytes_in_per_s'])}/s in, {_bytes(total['bytes_out_per_s'])}/s out",
        "",
    ]
    header = ("WORKER", "PID", "STATE", "CONNS", "CONN/S", "SHARE", "IN/S", "OUT/S", "ACCEPTED")
    table = [header] + [
        (
            str(r.worker),
            str(r.pid),
            r.state,
            str(r.connections),
            _number(r.connections_per_s),
            "-" if r.share is None else f"{100 * r.share:.0f}%",
            _bytes(r.bytes_in_per_s),
            _bytes(r.bytes_out_per_s),
            str(r.accepted),
        )
        for r in rows
    ]
    return lines + aligned(table, left_column=2)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _bytes(value: float | None) -> str:
    return "-" if value is None else human_bytes(value)
