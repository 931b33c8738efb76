"""In-place upgrade (USR2): the master re-executes itself in the same pid.

1. Pre-flight: run the installed code's ``--check-config`` with the master's own
   arguments in a child. If the new code or the config does not load, nothing
   changes.
2. Hand-off: listening sockets, the pidfile (its lock lives on the open file, so
   it survives exec), the master-alive pipe and the table of running workers are
   passed to the new image through inheritable fds and one environment variable.
3. ``execv``: same pid, so systemd's MainPID, the pidfile and a container
   runtime see no change; the old workers remain our children and are adopted,
   then retired gracefully once the new generation serves.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from echod import logs
from echod.pidfile import PidFile
from echod.scoreboard import MasterCounter, Scoreboard
from echod.server.children import MASTER_SIGNALS, describe_exit
from echod.server.listeners import Listener
from echod.system.systemd import SYSTEMD_CHILD_VARIABLES

log = logging.getLogger("echod.master")

HANDOFF_ENV = "_ECHOD_UPGRADE"  # not ECHOD_*: that prefix is for config keys
# Where echod was started: relative paths in its arguments are relative to it. A
# daemon lives in /, so the pre-flight and the new image run from here instead.
LAUNCH_DIRECTORY = os.getcwd()
PREFLIGHT_TIMEOUT = 30.0


def program_argv() -> list[str]:
    """How to start the installed echod again with this master's arguments."""
    return [sys.executable, "-m", "echod", *sys.argv[1:]]


@dataclass
class AdoptedWorker:
    pid: int
    worker_id: int
    generation: int
    dismissed: bool = False  # was told to drain: the new image keeps it draining
    # time.monotonic() when it was forked: CLOCK_MONOTONIC is the system's, so it
    # means the same in the new image (0.0: an older image did not say)
    started: float = 0.0


@dataclass
class Handoff:
    listener_fds: dict[str, int]  # configured address -> fd
    pidfile_fd: int
    alive_read: int
    alive_write: int
    generation: int
    desired: int
    workers: list[AdoptedWorker] = field(default_factory=list)
    activated: list[str] = field(default_factory=list)  # systemd's sockets, by address
    helpers: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> address -> fd

    @classmethod
    def of(
        cls,
        listeners: list[Listener],
        pidfile: PidFile,
        alive_read: int,
        alive_write: int,
        *,
        generation: int,
        desired: int,
        workers: list[AdoptedWorker],
        helpers: dict[str, dict[str, int]],
    ) -> Handoff:
        return cls(
            listener_fds={str(listener.address): listener.fileno() for listener in listeners},
            pidfile_fd=pidfile.keep_across_exec(),
            alive_read=alive_read,
            alive_write=alive_write,
            generation=generation,
            desired=desired,
            workers=workers,
            activated=[str(listener.address) for listener in listeners if listener.activated],
            helpers={name: fds for name, fds in helpers.items() if fds},
        )

    def fds(self) -> list[int]:
        """Every descriptor the new image needs."""
        return [
            *self.listener_fds.values(),
            self.pidfile_fd,
            self.alive_read,
            self.alive_write,
            *(fd for fds in self.helpers.values() for fd in fds.values()),
        ]

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> Handoff:
        data: dict[str, Any] = json.loads(text)
        # An image from before helpers handed over their own sockets named these.
        bind, fd = data.pop("metrics_bind", ""), data.pop("metrics_fd", -1)
        if bind:
            data.setdefault("helpers", {})["metrics"] = {bind: fd}
        workers = []
        for worker in data["workers"]:
            if "retiring" in worker:
                worker["dismissed"] = worker.pop("retiring")
            workers.append(AdoptedWorker(**_known(AdoptedWorker, worker)))
        data["workers"] = workers
        return cls(**_known(cls, data))


def _known(kind: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields this image knows. A newer image may hand over more (a USR2 back
    to this version, say): starting without them beats not starting at all."""
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        log.warning(
            "upgrade hand-off: ignoring what this version does not know: %s", ", ".join(unknown)
        )
    return {key: value for key, value in data.items() if key in names}


def take_handoff() -> Handoff | None:
    """In a freshly exec'd master: the state its previous image left, if any."""
    text = os.environ.pop(HANDOFF_ENV, None)
    if not text:
        return None
    return Handoff.decode(text)


@dataclass
class Preflight:
    """A `--check-config` run of the installed code, watched from the master's loop."""

    pid: int
    output_fd: int
    started: float
    output: bytearray = field(default_factory=bytearray)
    status: int | None = None

    @classmethod
    def start(cls, now: float) -> Preflight:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, write_fd, 1),
            (os.POSIX_SPAWN_DUP2, write_fd, 2),
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if k != HANDOFF_ENV and k not in SYSTEMD_CHILD_VARIABLES
        }
        here = os.getcwd()
        try:
            os.chdir(LAUNCH_DIRECTORY)
            pid = os.posix_spawn(
                sys.executable,
                [*program_argv(), "--check-config"],
                env,
                file_actions=actions,
                setsigdef=(signal.SIGTERM, signal.SIGINT),
            )
        finally:
            os.chdir(here)
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        return cls(pid, read_fd, now)

    def collect_output(self) -> None:
        while len(self.output) < 65536:
            try:
                chunk = os.read(self.output_fd, 4096)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.output += chunk

    def finish(self, status: int) -> None:
        self.status = status
        self.collect_output()
        os.close(self.output_fd)

    @property
    def succeeded(self) -> bool:
        return (
            self.status is not None
            and os.WIFEXITED(self.status)
            and os.WEXITSTATUS(self.status) == 0
        )

    @property
    def summary(self) -> str:
        text = self.output.decode(errors="replace").strip().replace("\n", " | ")
        return text or "no output"


@dataclass
class Upgrade:
    """The USR2 sequence as the master's loop drives it: request, watch, then hand off.

    ``request`` starts the pre-flight; the loop calls ``watch`` every tick and
    ``preflight_exited`` when it reaps the pre-flight child. On success this
    process becomes the new image (``execv``, same pid); on any failure,
    everything keeps running as it was.
    """

    scoreboard: Scoreboard
    on_reloading: Callable[[], None]
    on_ready: Callable[[], None]
    preflight: Preflight | None = None
    abandoned: bool = False  # stopping killed the pre-flight: its exit changes nothing

    @property
    def in_progress(self) -> bool:
        return self.preflight is not None

    def owns(self, pid: int) -> bool:
        return self.preflight is not None and pid == self.preflight.pid

    def request(self, *, stopping: bool) -> None:
        if stopping or self.preflight is not None:
            log.warning(
                "upgrade ignored: %s", "stopping" if stopping else "an upgrade is already under way"
            )
            return
        log.info("upgrade requested: checking that the installed code and config load")
        self.on_reloading()
        try:
            self.preflight = Preflight.start(time.monotonic())
        except OSError as exc:
            log.error("upgrade aborted: cannot run the pre-flight check: %s", exc.strerror)
            self._failed()

    def abandon(self, kill: Callable[[int, signal.Signals], None]) -> None:
        """Any stop (TERM, with or without shutdown_delay, INT, QUIT): a pre-flight
        that passed later would exec a fresh image and lose the stop, so kill it."""
        if self.preflight is None or self.abandoned:
            return
        self.abandoned = True
        kill(self.preflight.pid, signal.SIGKILL)
        log.warning("upgrade abandoned: echod is stopping")
        self.scoreboard.count_event(MasterCounter.UPGRADES_FAILED)

    def watch(self, now: float, kill: Callable[[int, signal.Signals], None]) -> None:
        if self.preflight is None:
            return
        self.preflight.collect_output()
        if now - self.preflight.started > PREFLIGHT_TIMEOUT:
            log.error("upgrade pre-flight hangs after %.0fs: killing it", PREFLIGHT_TIMEOUT)
            kill(self.preflight.pid, signal.SIGKILL)

    def preflight_exited(
        self,
        status: int,
        *,
        stopping: bool,
        handoff: Callable[[], Handoff],
        before_exec: Callable[[], None],
        blocker: Callable[[], str | None] = lambda: None,
    ) -> None:
        """The pre-flight ended: exec the new image if it passed, we still serve and
        nothing the new image takes over by path is gone (``blocker`` says what)."""
        preflight, self.preflight = self.preflight, None
        assert preflight is not None
        preflight.finish(status)
        if self.abandoned:
            self.abandoned = False
            return  # logged and counted when it was killed; never exec now
        if not preflight.succeeded or stopping:
            log.error(
                "upgrade aborted, everything keeps running as it was: the pre-flight check %s: %s",
                describe_exit(status),
                preflight.summary,
            )
            self.scoreboard.count_event(MasterCounter.UPGRADES_FAILED)
            if not stopping:
                self.on_ready()
            return
        problem = blocker()
        if problem:
            log.error("upgrade aborted, everything keeps running as it was: %s", problem)
            self._failed()
            return
        state = handoff()
        log.info("upgrade: pre-flight passed; re-executing in place (pid %d)", os.getpid())
        logs.flush()
        before_exec()
        try:
            exec_new_image(state, state.fds(), MASTER_SIGNALS)
        except OSError as exc:
            log.error("upgrade aborted: exec failed: %s", exc.strerror)
            self._failed()

    def _failed(self) -> None:
        self.scoreboard.count_event(MasterCounter.UPGRADES_FAILED)
        self.on_ready()


def exec_new_image(
    handoff: Handoff, keep_fds: Iterable[int], blocked_signals: Iterable[signal.Signals]
) -> None:
    """Replace this process image; returns only if exec failed (then nothing changed)."""
    fds = list(keep_fds)
    for fd in fds:
        os.set_inheritable(fd, True)
    env = dict(os.environ)
    env[HANDOFF_ENV] = handoff.encode()
    # Signals stay blocked across exec (the mask is inherited), so one arriving
    # before the new image installs its handlers waits instead of killing us.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked_signals)
    here = os.getcwd()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(LAUNCH_DIRECTORY)
        os.execve(sys.executable, program_argv(), env)
    except OSError:
        os.chdir(here)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for fd in fds:
            os.set_inheritable(fd, False)
        raise
