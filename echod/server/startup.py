"""Start-up in the order that keeps errors on the user's terminal:

    runtime directory (made, or refused if unsafe) -> log file -> pidfile lock
    -> bind (or take systemd's sockets) -> detach -> scoreboard -> drop privileges -> master

Everything that can fail because of the user's input fails before detaching,
so the launching command prints it and exits with its code. ``fresh_start``
opens the resources; in the image an in-place upgrade re-executed,
``take_over`` adopts the pidfile, sockets and scoreboard instead. Both return
one ``Resources``, and the rest of ``serve`` is the same for both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from echod import installed_version, logs, rundir
from echod.config import Config
from echod.errors import EchodError
from echod.pidfile import PidFile
from echod.scoreboard import Scoreboard, State, scoreboard_path
from echod.server.listeners import Listener, adopt_sockets, open_listeners, take_activated_sockets
from echod.server.master import Hooks, Master
from echod.server.metrics_child import MetricsService
from echod.server.phases import MasterPhase
from echod.server.upgrade import Handoff, take_handoff
from echod.system.daemonize import ReadinessReporter, launch_daemon
from echod.system.privileges import chown_for, drop_privileges, resolve_identity
from echod.system.systemd import Notifier, scrub_child_environ

log = logging.getLogger("echod")
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to systemd


def default_daemon_log(config: Config) -> str:
    if os.geteuid() == 0:
        return "/var/log/echod/echod.log"
    return os.path.join(config.runtime_dir, "echod.log")


@dataclass
class Resources:
    """What start-up hands the master: opened fresh, or taken over after an upgrade."""

    listeners: list[Listener]
    pidfile: PidFile
    metrics: MetricsService
    handoff: Handoff | None = None  # set on a take-over
    scoreboard: Scoreboard | None = None  # a take-over attaches now; a fresh start after detaching

    def sockets(self) -> list[Listener]:
        return [*self.listeners, *self.metrics.sockets()]


def serve(
    config: Config, load_config: Callable[[], Config], *, foreground: bool, code_started: float
) -> int:
    """Run echod until it stops; return the exit code."""
    handoff = take_handoff()
    log_file = config.log_file or ("" if foreground else default_daemon_log(config))
    os.umask(config.umask)
    if handoff is None:  # before the default daemon log is opened in it
        _make_runtime_dirs(config)
    _setup_logging(config, log_file)
    if handoff is None:
        resources = fresh_start(config)
    else:
        resources = take_over(config, handoff, foreground=foreground)
    reporter: ReadinessReporter | None = None
    if not foreground and handoff is None:
        reporter = _detach(config, resources)
    try:
        if resources.scoreboard is None:
            resources.scoreboard = Scoreboard.create(scoreboard_path(str(resources.pidfile.path)))
            _drop_privileges(config, log_file, resources.scoreboard)
        code = _run_master(config, load_config, resources, reporter, code_started, log_file)
    except EchodError as exc:
        if reporter is not None:
            reporter.failed(exc.exit_code, f"echod: {exc}")
        raise
    finally:
        resources.pidfile.release()
    if reporter is not None:
        reporter.failed(code, f"echod: stopped before serving (exit {code}); see {log_file}")
    return code


def fresh_start(config: Config) -> Resources:
    """Check the identity, lock the pidfile, then bind: each failure exits with its code."""
    if config.user or config.group:
        resolve_identity(config.user or None, config.group or None)  # typos fail now
    pidfile = PidFile(config.pidfile_path)
    pidfile.acquire()  # a second instance fails here, before binding anything
    try:
        listeners = _open_all_listeners(config)
        metrics = MetricsService.open(config.metrics_bind)  # a port in use: exit 69 here
    except BaseException:
        pidfile.release()
        raise
    return Resources(listeners, pidfile, metrics)


def take_over(config: Config, handoff: Handoff, *, foreground: bool) -> Resources:
    """In the image an in-place upgrade started: everything the previous one held."""
    if not foreground:
        os.chdir("/")  # a daemon again, like the image it replaced
    pidfile = PidFile.adopt(config.pidfile_path, handoff.pidfile_fd)
    listeners = _take_over_listeners(config, handoff)
    metrics = MetricsService.adopt(handoff.helpers.get(MetricsService.name, {}))
    scoreboard = Scoreboard.attach(scoreboard_path(str(pidfile.path)))
    return Resources(listeners, pidfile, metrics, handoff, scoreboard)


def _detach(config: Config, resources: Resources) -> ReadinessReporter:
    """Become a daemon, keeping our sockets, the pidfile lock and the log files."""
    pidfile = resources.pidfile
    keep = [listener.fileno() for listener in resources.sockets()]
    reporter = launch_daemon(
        files_preserve=[*keep, pidfile.keep_across_exec(), *logs.log_file_descriptors()],
        umask=config.umask,
    )
    os.set_inheritable(pidfile.keep_across_exec(), False)
    pidfile.write(os.getpid())
    return reporter


def _run_master(
    config: Config,
    load_config: Callable[[], Config],
    resources: Resources,
    reporter: ReadinessReporter | None,
    code_started: float,
    log_file: str,
) -> int:
    assert resources.scoreboard is not None
    pidfile = resources.pidfile

    def in_child() -> None:
        pidfile.close_in_child()
        if reporter is not None:
            reporter.close()
        scrub_child_environ(os.environ)  # children never talk to systemd

    master = Master(
        config=config,
        listeners=resources.listeners,
        scoreboard=resources.scoreboard,
        load_config=load_config,
        pidfile=pidfile,
        hooks=SystemdHooks(Notifier.from_environ(), reporter).hooks(),
        close_in_child=in_child,
        version=installed_version(),
        code_started=code_started,
        handoff=resources.handoff,
        helpers=[resources.metrics],
        default_log_file=log_file if not config.log_file else "",
    )
    return master.run()


@dataclass
class SystemdHooks:
    """Tells systemd (and a waiting daemon launcher) what the master is doing."""

    notifier: Notifier
    reporter: ReadinessReporter | None
    next_watchdog: float = 0.0
    next_status: float = 0.0
    status: str = ""  # the last STATUS= sent, so an unchanged line is not sent again
    stopping_sent: bool = False  # STOPPING=1 is final: no READY=1, no second STOPPING=1

    def __post_init__(self) -> None:
        self.watchdog_interval = self.notifier.watchdog_interval()

    def hooks(self) -> Hooks:
        return Hooks(
            on_ready=self.on_ready,
            on_reloading=lambda master: self.notifier.reloading(),
            on_stopping=self.on_stopping,
            on_shutting_down=self.on_shutting_down,
            on_tick=self.on_tick,
            on_drain=self.on_drain,
        )

    def on_ready(self, master: Master) -> None:
        # A TERM during start-up (shutdown_delay keeps the workers booting): READY=1
        # after STOPPING=1 would tell systemd the unit is back up.
        if not self.stopping_sent:
            self.notifier.ready(_status_line(master))
        if self.reporter is not None:
            self.reporter.ready()

    def on_shutting_down(self, master: Master) -> None:
        """STOPPING=1 at TERM, not at the delay's end: it arms TimeoutStopSec, which
        must cover shutdown_delay + graceful_timeout. The STATUS line goes with it at
        once, so systemctl status shows why the instance is still up."""
        self.status = _status_line(master)
        self.stopping_sent = True
        self.notifier.stopping(self.status)

    def on_stopping(self, master: Master) -> None:
        if not self.stopping_sent:  # no delay, or INT/QUIT: STOPPING=1 now
            self.stopping_sent = True
            self.notifier.stopping()

    def on_drain(self, master: Master) -> None:
        """At once, not at the next STATUS_INTERVAL: systemctl status says why /readyz fails."""
        self.next_status = 0.0
        self.on_tick(master)

    def on_tick(self, master: Master) -> None:
        now = time.monotonic()
        serving = master.serving_workers()
        # The watchdog only hears from a master whose loop runs and that serves.
        if self.watchdog_interval and serving and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_interval
        if self.notifier.enabled and now >= self.next_status:
            status = _status_line(master)
            if status != self.status:
                self.notifier.status(status)
                self.status = status
            self.next_status = now + STATUS_INTERVAL


def _status_line(master: Master) -> str:
    slots = [master.scoreboard.slot(w.slot) for w in master.workers.values()]
    serving = sum(1 for s in slots if s.state in (State.READY, State.RETIRING))
    active = sum(s.active for s in slots)
    line = f"{serving} worker(s) serving, {active} connection(s), generation {master.generation}"
    if master.phase is MasterPhase.SHUTTING_DOWN:
        left = max(0.0, master.shutdown_ends - time.monotonic())
        return f"shutting down: not ready, still serving for {left:.0f} s; {line}"
    if master.drain.draining:
        return f"draining: not ready, still serving (echoctl undrain); {line}"
    return line


def _setup_logging(config: Config, log_file: str) -> None:
    try:
        logs.setup_logging(config.log_level, log_file, config.log_format, config.access_log)
    except OSError as exc:
        raise EchodError(f"cannot open log file {log_file}: {exc.strerror}") from None


def _open_all_listeners(config: Config) -> list[Listener]:
    """Configured binds, taking systemd's sockets (socket activation) where given."""
    activated, extra = take_activated_sockets(config.addresses)
    listeners = open_listeners(config.addresses, config.backlog, activated)
    for listener in listeners:
        if listener.address in activated:
            listener.activated = True
    return listeners + extra


def _take_over_listeners(config: Config, handoff: Handoff) -> list[Listener]:
    inherited = adopt_sockets(handoff.listener_fds)
    activated = set(handoff.activated)
    listeners = open_listeners(config.addresses, config.backlog, inherited)
    wanted = set(config.addresses)
    for address, sock in inherited.items():
        if address in wanted:
            continue
        if str(address) in activated:  # systemd's, outside the config: keep serving it
            listeners.append(Listener(address, sock, activated=True))
        else:
            log.info("no longer listening on %s", address)
            sock.close()
    for listener in listeners:
        listener.activated = listener.activated or str(listener.address) in activated
    return listeners


def _drop_privileges(config: Config, log_file: str, scoreboard: Scoreboard) -> None:
    if not (config.user or config.group) or os.geteuid() != 0:
        return
    user, group = config.user or None, config.group or None
    paths = [config.runtime_dir, config.pidfile_path, scoreboard.path]
    if log_file:
        paths.append(log_file)
    chown_for(user, group, paths)  # so the master can still reopen and clean up
    drop_privileges(user, group)
    log.info("running as user %s group %s", user or "(unchanged)", group or "(unchanged)")


def _make_runtime_dirs(config: Config) -> None:
    """The runtime directory, and the pidfile's (scoreboard, stack dumps) if elsewhere.

    Created if missing; refused (exit 77) if anyone else could control them.
    """
    owners: list[int] = []
    if config.user and os.geteuid() == 0:
        identity = resolve_identity(config.user, config.group or None)  # typos fail now
        if identity.uid is not None:
            owners.append(identity.uid)  # _drop_privileges handed it to them last time
    paths = [config.runtime_dir]
    pidfile_dir = os.path.dirname(os.path.abspath(config.pidfile_path))
    if pidfile_dir != os.path.abspath(config.runtime_dir):
        paths.append(pidfile_dir)
    for path in paths:
        rundir.make(path, owners)
        logs.never_follow_symlinks_in(path)
        with contextlib.suppress(OSError):
            if not os.access(path, os.W_OK):
                raise EchodError(f"runtime directory {path} is not writable")
