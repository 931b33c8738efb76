"""Start-up in the order that keeps errors on the user's terminal:

    log file -> pidfile lock -> bind (or take systemd's sockets) -> detach
    -> scoreboard -> drop privileges -> master

Everything that can fail because of the user's input fails before detaching,
so the launching command prints it and exits with its code. After an in-place
upgrade the same function runs in the re-executed image and takes the pidfile,
sockets and scoreboard over instead of creating them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from echod import installed_version, logs
from echod.addresses import parse_address
from echod.config import Config
from echod.errors import EchodError
from echod.metrics.service import MetricsService
from echod.pidfile import PidFile
from echod.scoreboard import Scoreboard, State, scoreboard_path
from echod.server.listeners import Listener, adopt_sockets, open_listeners, take_activated_sockets
from echod.server.master import Hooks, Master
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


def serve(config: Config, source: object, *, foreground: bool, code_started: float) -> int:
    """Run echod until it stops; return the exit code."""
    handoff = take_handoff()
    daemon_mode = not foreground and handoff is None
    log_file = config.log_file or ("" if foreground else default_daemon_log(config))
    os.umask(config.umask)
    _setup_logging(config, log_file)
    if handoff is not None:
        if not foreground:
            os.chdir("/")  # a daemon again, like the image it replaced
        pidfile = PidFile.adopt(config.pidfile_path, handoff.pidfile_fd)
        listeners = _take_over_listeners(config, handoff)
        metrics = _take_over_metrics(handoff)
        scoreboard = Scoreboard.attach(scoreboard_path(str(pidfile.path)))
    else:
        if config.user or config.group:
            resolve_identity(config.user or None, config.group or None)  # typos fail now
        _make_runtime_dir(config.runtime_dir)
        pidfile = PidFile(config.pidfile_path)
        pidfile.acquire()  # a second instance fails here, before binding anything
        try:
            listeners = _open_all_listeners(config)
            metrics = MetricsService.open(config.metrics_bind)  # a port in use: exit 69 here
        except BaseException:
            pidfile.release()
            raise
    reporter: ReadinessReporter | None = None
    if daemon_mode:
        keep = [listener.fileno() for listener in [*listeners, *metrics.listeners()]]
        reporter = launch_daemon(files_preserve=[*keep, pidfile.keep_across_exec(),
                                                 *logs.log_file_descriptors()],
                                 umask=config.umask)
        os.set_inheritable(pidfile.keep_across_exec(), False)
        pidfile.write(os.getpid())
    try:
        if handoff is None:
            scoreboard = Scoreboard.create(scoreboard_path(str(pidfile.path)))
            _drop_privileges(config, log_file, scoreboard)
        code = _run_master(config, source, listeners, scoreboard, pidfile, reporter,
                           handoff, code_started, metrics, log_file)
    except EchodError as exc:
        if reporter is not None:
            reporter.failed(exc.exit_code, f"echod: {exc}")
        raise
    finally:
        pidfile.release()
    if reporter is not None:
        reporter.failed(code, f"echod: stopped before serving (exit {code}); see {log_file}")
    return code


def _run_master(config: Config, source: object, listeners: list[Listener],
                scoreboard: Scoreboard, pidfile: PidFile, reporter: ReadinessReporter | None,
                handoff: Handoff | None, code_started: float, metrics: MetricsService,
                log_file: str) -> int:
    notifier = Notifier.from_environ()

    def in_worker() -> None:
        pidfile.close_in_child()
        if reporter is not None:
            reporter.close()
        scrub_child_environ(os.environ)  # workers never talk to systemd

    master = Master(
        config=config,
        listeners=listeners,
        scoreboard=scoreboard,
        load_config=source.load,  # type: ignore[attr-defined]
        pidfile=pidfile,
        hooks=_systemd_hooks(notifier, reporter),
        close_in_worker=in_worker,
        version=installed_version(),
        code_started=code_started,
        handoff=handoff,
        helpers=[metrics],
        default_log_file=log_file if not config.log_file else "",
    )
    return master.run()


def _systemd_hooks(notifier: Notifier, reporter: ReadinessReporter | None) -> Hooks:
    watchdog_interval = notifier.watchdog_interval()
    state = {"next_watchdog": 0.0, "next_status": 0.0, "status": ""}

    def on_ready(master: Master) -> None:
        notifier.ready(_status_line(master))
        if reporter is not None:
            reporter.ready()

    def on_tick(master: Master) -> None:
        now = time.monotonic()
        serving = master.serving_workers()
        # The watchdog only hears from a master whose loop runs and that serves.
        if watchdog_interval and serving and now >= state["next_watchdog"]:
            notifier.watchdog()
            state["next_watchdog"] = now + watchdog_interval
        if notifier.enabled and now >= state["next_status"]:
            status = _status_line(master)
            if status != state["status"]:
                notifier.status(status)
                state["status"] = status
            state["next_status"] = now + STATUS_INTERVAL

    return Hooks(
        on_ready=on_ready,
        on_reloading=lambda master: notifier.reloading(),
        on_stopping=lambda master: notifier.stopping(),
        on_tick=on_tick,
    )


def _status_line(master: Master) -> str:
    slots = [master.scoreboard.slot(w.slot) for w in master.workers.values()]
    serving = sum(1 for s in slots if s.state in (State.READY, State.RETIRING))
    active = sum(s.active for s in slots)
    return (f"{serving} worker(s) serving, {active} connection(s), "
            f"generation {master.generation}")


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


def _take_over_metrics(handoff: Handoff) -> MetricsService:
    if not handoff.metrics_bind:
        return MetricsService()
    (sock,) = adopt_sockets({handoff.metrics_bind: handoff.metrics_fd}).values()
    return MetricsService(bind=handoff.metrics_bind,
                          listener=Listener(parse_address(handoff.metrics_bind), sock))


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


def _make_runtime_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise EchodError(f"cannot create runtime directory {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):
        if not os.access(path, os.W_OK):
            raise EchodError(f"runtime directory {path} is not writable")

