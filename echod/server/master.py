"""The master: binds once, forks workers, and supervises them.

Its loop is the whole story: wait for a signal or the next timer, handle what
arrived, check on the workers, repeat. Signal handlers never do work; they
only wake the loop (see ``signals``). Workers are tracked in the master's own
table, one phase each (see ``phases``), and on the shared scoreboard, where
they publish heartbeats and counters.

Building a ``Master`` has no side effects; ``open()`` (called by ``run()``)
creates the master-alive pipe and installs the signal handlers. So tests build
one with a fake ``Children`` and drive its decisions in-process.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from echod import exitcodes, logs, procname
from echod.config import MAX_WORKERS, Config
from echod.errors import EchodError
from echod.limits.admission import SharedLimits
from echod.pidfile import PidFile
from echod.scoreboard import MasterCounter, MasterStatus, Scoreboard, State, WorkerSlot
from echod.server import access, fitting, reload_report
from echod.server.children import (
    MASTER_SIGNALS,
    Children,
    Helper,
    Inheritance,
    RestartBackoff,
    describe_exit,
)
from echod.server.drain_switch import DrainSwitch
from echod.server.listeners import Listener, reconcile
from echod.server.phases import (
    WORKER_MOVES,
    MasterPhase,
    WorkerPhase,
    WorkerProcess,
    check_master_move,
)
from echod.server.signals import SignalQueue
from echod.server.upgrade import AdoptedWorker, Handoff, Upgrade
from echod.server.worker import WorkerIdentity, start_worker
from echod.system.oom import OomWatch

log = logging.getLogger("echod.master")

ABORT_GRACE = 1.0  # seconds between SIGABRT (stack dump) and SIGKILL for a hung worker
FAST_STOP_GRACE = 2.0  # seconds workers get to exit on a fast stop before SIGKILL
IDLE_TICK = 1.0
BUSY_TICK = 0.1


@dataclass
class Hooks:
    """What the layers around the master (systemd, daemon launcher) want to hear."""

    on_ready: Callable[[Master], None] = lambda master: None
    on_reloading: Callable[[Master], None] = lambda master: None
    on_stopping: Callable[[Master], None] = lambda master: None
    on_shutting_down: Callable[[Master], None] = lambda master: None
    on_tick: Callable[[Master], None] = lambda master: None
    on_drain: Callable[[Master], None] = lambda master: None  # echoctl drain / undrain


@dataclass
class Master:
    config: Config
    listeners: list[Listener]
    scoreboard: Scoreboard
    load_config: Callable[[], Config]
    pidfile: PidFile
    hooks: Hooks = field(default_factory=Hooks)
    close_in_child: Callable[[], None] = lambda: None  # the layers around us, in every child
    version: str = ""
    code_started: float = 0.0
    handoff: Handoff | None = None  # set when this image was started by an upgrade
    helpers: list[Helper] = field(default_factory=list)
    default_log_file: str = ""  # where logs go when the config names no file (daemon mode)
    # created here, before any fork, so that every worker maps the same pages
    limits: SharedLimits = field(default_factory=SharedLimits)
    children: Children = field(default_factory=Children)
    oom: OomWatch = field(default_factory=OomWatch)  # tells OOM kills from other SIGKILLs

    def __post_init__(self) -> None:  # bookkeeping only: the side effects wait for open()
        self.pid = os.getpid()
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 1
        self.sizing = fitting.workers_for(self.config)
        self.desired = self.sizing.count
        self.descriptors = fitting.DescriptorLimit()
        self.phase = MasterPhase.RUNNING
        self.stop_deadline = 0.0
        self.shutdown_ends = 0.0  # SHUTTING_DOWN: when the graceful stop begins
        self.exit_code = exitcodes.OK
        self.ready_announced = False
        self.backoff: dict[int, RestartBackoff] = {}  # by worker id
        self.upgrade = Upgrade(
            self.scoreboard,
            lambda: self.hooks.on_reloading(self),
            lambda: self.hooks.on_ready(self),
        )
        self.signals: SignalQueue | None = None
        self.alive_read = self.alive_write = -1
        self.drain = DrainSwitch(str(self.pidfile.path), self.scoreboard)

    def open(self) -> None:
        """The master-alive pipe (or the adopted one) and the signal handlers."""
        self.scoreboard.config_loaded(True, time.time())
        if self.handoff is None:
            self.alive_read, self.alive_write = os.pipe2(os.O_CLOEXEC)
            self.drain.forget_stale()
        else:
            self.alive_read, self.alive_write = self.handoff.alive_read, self.handoff.alive_write
            os.set_inheritable(self.alive_read, False)
            os.set_inheritable(self.alive_write, False)
            self.adopt(self.handoff)
        self.signals = SignalQueue(MASTER_SIGNALS)
        # an upgrade exec'd us with these blocked; our handlers are in place now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        self.children.inherited = Inheritance(
            self.signals,
            self.alive_read,
            self.alive_write,
            self.pid,
            self.close_in_child,
            self._sockets,
        )
        for helper in self.helpers:
            helper.attach(self.children, self.scoreboard)

    def adopt(self, handoff: Handoff) -> None:
        """After an in-place upgrade: take over the previous image's workers."""
        now = time.monotonic()
        for adopted in handoff.workers:
            # its own start, not ours: a mature worker dying now is no young death
            started = adopted.started if 0.0 < adopted.started <= now else now
            worker = WorkerProcess(
                adopted.pid, adopted.worker_id, adopted.generation, started, WorkerPhase.SERVING
            )
            if adopted.dismissed:  # was draining already: give it a fresh deadline
                worker.move(WorkerPhase.DRAINING, now + self.config.reload_limit + 1.0)
            self.workers[adopted.pid] = worker
        self.generation = handoff.generation + 1
        self.desired = handoff.desired
        self._move(MasterPhase.ADOPTING)  # old workers retire once the new generation serves
        self.ready_announced = True
        self.scoreboard.count_event(MasterCounter.UPGRADES_OK)
        log.info(
            "upgraded in place to echod %s: adopted %d worker(s) of generation %d; "
            "starting generation %d",
            self.version,
            len(handoff.workers),
            handoff.generation,
            self.generation,
        )

    # -- the story ---------------------------------------------------------------
    def run(self) -> int:
        self.open()
        procname.set_title(f"master ({', '.join(str(a) for a in self.config.bind)})")
        self._publish_master()
        self._announce_listeners()
        self._fit_the_machine(announce=self.handoff is None)  # an upgrade keeps its count
        self._supervise(time.monotonic())  # the first workers start now, not a tick later
        while True:
            for signum in self._wait_for_signals(self._next_tick()):
                self._handle_signal(signum)
            self._reap()
            if self.phase is MasterPhase.STOPPING and not self.workers:
                break
            self._supervise(time.monotonic())
        self._cleanup()
        return self.exit_code

    def _fit_the_machine(self, announce: bool) -> None:
        """Before a generation forks: workers for the CPUs, descriptors for the connections."""
        if announce:
            fitting.announce_workers(self.sizing)
        self.descriptors.fit(self.config)
        fitting.fit_receive_buffers(self.listeners, self.config)

    def _wait_for_signals(self, timeout: float) -> list[signal.Signals]:
        assert self.signals is not None
        try:
            readable, _, _ = select.select([self.signals], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            readable = []
        return self.signals.drain() if readable else []

    def _next_tick(self) -> float:
        """Idle only when nothing is due: no switch, stop, upgrade, or worker on the move."""
        settled = (
            self.phase is MasterPhase.RUNNING
            and self.ready_announced
            and not self.upgrade.in_progress
            and all(w.phase.settled for w in self.workers.values())
            and len(self._current()) >= self.desired
        )
        return IDLE_TICK if settled else BUSY_TICK

    def _handle_signal(self, signum: signal.Signals) -> None:
        match signum:
            case signal.SIGCHLD:
                pass  # reaping happens every iteration
            case signal.SIGTERM:
                self.stop(graceful=True)
            case signal.SIGINT | signal.SIGQUIT:
                self.stop(graceful=False)
            case signal.SIGHUP:
                self.reload()
            case signal.SIGTTIN:
                self.scale(self.desired + 1)
            case signal.SIGTTOU:
                self.scale(self.desired - 1)
            case signal.SIGUSR1:
                log.info("reopening log files")
                logs.reopen_log_files()
                self._signal_workers(signal.SIGUSR1)
            case signal.SIGUSR2:
                self.upgrade.request(stopping=self._leaving())

    def _leaving(self) -> bool:
        return self.phase in (MasterPhase.SHUTTING_DOWN, MasterPhase.STOPPING)

    def _supervise(self, now: float) -> None:
        self.scoreboard.master_heartbeat(now)  # /healthz: the master is alive and looping
        if self.phase is MasterPhase.SHUTTING_DOWN and now >= self.shutdown_ends:
            self._stop_now(graceful=True)
        self._kill_hung_workers(now)
        self._enforce_retire_deadlines(now)
        self.upgrade.watch(now, self.children.kill)
        if self.phase is not MasterPhase.STOPPING:
            if self.drain.follow():
                self.hooks.on_drain(self)
            self._read_scoreboard()
            self._recycle_replaced_workers()
            self._spawn_missing(now)
            self._finish_generation_switch()
            self._announce_ready_once()
        for helper in self.helpers:
            helper.supervise(self.config, self.phase is MasterPhase.STOPPING, now)
        self.hooks.on_tick(self)

    def _move(self, to: MasterPhase) -> None:
        self.phase = check_master_move(self.phase, to)

    # -- spawning ------------------------------------------------------------------
    def _current(self) -> list[WorkerProcess]:
        """Workers of the current generation that were not sent away."""
        return [
            w for w in self.workers.values() if w.generation == self.generation and not w.dismissed
        ]

    def _spawn_missing(self, now: float) -> None:
        replacing = WorkerPhase.REPLACING
        missing = self.desired - sum(1 for w in self._current() if w.phase is not replacing)
        for _ in range(missing):
            worker_id = self._free_worker_id()
            if worker_id in self.backoff and not self.backoff[worker_id].may_start(now):
                return  # backing off: this one kept dying at boot
            self._spawn(worker_id)

    def _free_worker_id(self) -> int:
        taken = {w.worker_id for w in self.workers.values()}
        worker_id = 1
        while worker_id in taken:
            worker_id += 1
        return worker_id

    def _spawn(self, worker_id: int) -> WorkerProcess:
        slot = worker_id - 1
        self.scoreboard.claim(slot, pid=0, generation=self.generation, worker_id=worker_id)
        identity = WorkerIdentity(worker_id, self.generation, self.pid)
        pid = self.children.fork(
            self.listeners,
            lambda: start_worker(
                self.config,
                self.listeners,
                WorkerSlot(self.scoreboard, slot),
                identity,
                self.alive_read,
                self.limits,
                on_close=access.close_hook(self.config),
            ),
            failed=f"worker {worker_id} failed to start",
            failure_code=exitcodes.WORKER_BOOT_FATAL,
        )
        self.scoreboard.set_pid(slot, pid)
        worker = WorkerProcess(pid, worker_id, self.generation, time.monotonic())
        self.workers[pid] = worker
        log.info("started worker %d (pid %d, generation %d)", worker_id, pid, self.generation)
        return worker

    def _sockets(self) -> list[Listener]:
        """Every socket the master holds: a child closes those that are not its own."""
        return [*self.listeners, *(s for helper in self.helpers for s in helper.sockets())]

    # -- reaping -------------------------------------------------------------------
    def _reap(self) -> None:
        for pid, status in self.children.reaped():
            if self.upgrade.owns(pid):
                self.upgrade.preflight_exited(
                    status,
                    stopping=self._leaving(),
                    handoff=self._handoff,
                    before_exec=self._before_exec,
                    blocker=self._upgrade_blocker,
                )
                continue
            worker = self.workers.pop(pid, None)
            if worker is None:
                for helper in self.helpers:
                    if helper.child_exited(pid, status):
                        break
                continue  # some other helper child
            self._on_worker_exit(worker, status)

    def _on_worker_exit(self, worker: WorkerProcess, status: int) -> None:
        logs.report_stack_dump(
            os.path.dirname(self.config.pidfile_path), worker.pid, f"worker {worker.worker_id}"
        )
        self.scoreboard.fold_into_retired(worker.slot)
        self.scoreboard.release(worker.slot)
        # its connections are gone, however it died: stop counting them against the limits
        self.limits.forget_worker(worker.slot, (w.slot for w in self.workers.values()))
        oom = self.oom.explain(status)  # every death: each OOM kill counted is claimed once
        if worker.dismissed or self.phase is MasterPhase.STOPPING:
            how = oom or describe_exit(status)
            log.info("worker %d (pid %d) %s", worker.worker_id, worker.pid, how)
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == exitcodes.WORKER_BOOT_FATAL:
            self.scoreboard.count_event(MasterCounter.RESTARTS_BOOT_FAILED)
            self._on_boot_failure(worker)
        else:
            self._on_worker_death(worker, status, oom)

    def _on_worker_death(self, worker: WorkerProcess, status: int, oom: str | None) -> None:
        """It died on its own, by the OOM killer (``oom`` says how), or hung and we
        killed it: count it, and back off if young."""
        now = time.monotonic()
        lifetime = now - worker.started
        hung = worker.phase is WorkerPhase.ABORTING and not oom
        died = describe_exit(status)
        if oom:
            reason, how = MasterCounter.RESTARTS_OOM, oom
        elif hung:
            reason, how = MasterCounter.RESTARTS_TIMEOUT, f"{died} after worker_timeout"
        else:
            reason, how = MasterCounter.RESTARTS_CRASHED, f"{died} unexpectedly"
        self.scoreboard.count_event(reason)
        log.error(
            "worker %d (pid %d) %s after %.1fs; replacing it",
            worker.worker_id,
            worker.pid,
            how,
            lifetime,
        )
        backoff = self.backoff.setdefault(worker.worker_id, RestartBackoff())
        delay = backoff.died(now, lifetime, blameless=hung)  # killed by us: not its fault
        if backoff.failures > 1:
            log.warning(
                "worker %d keeps dying young (%d in a row): next start in %.1fs",
                worker.worker_id,
                backoff.failures,
                delay,
            )
        if not backoff.failures:
            del self.backoff[worker.worker_id]

    def _on_boot_failure(self, worker: WorkerProcess) -> None:
        older = [w for w in self.workers.values() if w.generation < worker.generation]
        if worker.generation == self.generation and older and self.phase.switching:
            log.error(
                "reload failed: workers of generation %d cannot start (see above); "
                "generation %d keeps serving",
                worker.generation,
                self.generation - 1,
            )
            self._abandon_generation()
            return
        log.critical(
            "worker %d (pid %d) cannot start (see the error above); stopping echod "
            "instead of restarting it in a loop",
            worker.worker_id,
            worker.pid,
        )
        self.exit_code = exitcodes.FAILURE
        self.stop(graceful=False)

    def _abandon_generation(self) -> None:
        for worker in self._current():
            self._retire(worker, graceful=False)
        self.generation -= 1
        self.desired = sum(1 for w in self._current())
        self._move(MasterPhase.RUNNING)
        self.hooks.on_ready(self)

    # -- timeouts ------------------------------------------------------------------
    def _kill_hung_workers(self, now: float) -> None:
        timeout = self.config.worker_timeout
        for worker in list(self.workers.values()):
            if worker.phase in (WorkerPhase.ABORTING, WorkerPhase.KILLED):
                if now >= worker.deadline:
                    self.children.kill(worker.pid, signal.SIGKILL)
                continue
            silent_for = now - self.scoreboard.slot(worker.slot).heartbeat
            if silent_for > timeout:
                log.error(
                    "worker %d (pid %d) silent for %.1fs (worker_timeout %gs): sending "
                    "SIGABRT for a stack dump, then SIGKILL",
                    worker.worker_id,
                    worker.pid,
                    silent_for,
                    timeout,
                )
                worker.move(WorkerPhase.ABORTING, now + ABORT_GRACE)
                self.children.kill(worker.pid, signal.SIGABRT)

    def _enforce_retire_deadlines(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if (
                worker.phase in (WorkerPhase.DRAINING, WorkerPhase.QUITTING)
                and now >= worker.deadline
            ):
                log.warning(
                    "worker %d (pid %d) did not finish in time: killing it",
                    worker.worker_id,
                    worker.pid,
                )
                worker.move(WorkerPhase.KILLED, now + ABORT_GRACE)  # no second warning
                self.children.kill(worker.pid, signal.SIGKILL)
        if self.phase is MasterPhase.STOPPING and now >= self.stop_deadline:
            for worker in self.workers.values():
                self.children.kill(worker.pid, signal.SIGKILL)

    def _retire(self, worker: WorkerProcess, graceful: bool = True, limit: float = -1.0) -> None:
        """Send a worker away: drain (TERM) for `limit` seconds (default: graceful_timeout;
        math.inf: never forced) or quit fast (QUIT), within a deadline."""
        to = WorkerPhase.DRAINING if graceful else WorkerPhase.QUITTING
        if worker.phase is WorkerPhase.ABORTING:
            worker.dismissed = True  # SIGKILL is coming anyway; its exit is now expected
            return
        limit = self.config.graceful_timeout if limit < 0 else limit
        deadline = time.monotonic() + (limit + 1.0 if graceful else FAST_STOP_GRACE)
        if graceful and worker.phase is WorkerPhase.DRAINING and deadline < worker.deadline:
            worker.deadline = deadline  # a stop while a reload's longer drain runs
        elif to not in WORKER_MOVES[worker.phase]:
            return  # already on its way out at least as fast
        else:
            worker.move(to, deadline)
        if graceful:  # the worker reads its limit in its slot when the TERM lands
            self.scoreboard.set_drain_timeout(worker.slot, limit)
        self.children.kill(worker.pid, signal.SIGTERM if graceful else signal.SIGQUIT)

    # -- reload, scaling, recycling ------------------------------------------------
    def reload(self) -> None:
        if self.phase in (MasterPhase.STOPPING, MasterPhase.SHUTTING_DOWN):
            log.info("not reloading: the master is stopping")
            return
        log.info("reloading configuration")
        self.hooks.on_reloading(self)
        try:
            new_config = self.load_config()
            change = reconcile(self.listeners, new_config.addresses, new_config.backlog)
        except EchodError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.scoreboard.config_loaded(False, 0.0)
            self.scoreboard.count_event(MasterCounter.RELOADS_FAILED)
            self.hooks.on_ready(self)
            return
        for listener in change.opened:
            log.info("listening on %s", listener.bound)
        for listener in change.removed:
            log.info("no longer listening on %s", listener.bound)
            listener.close()
        self.listeners = change.listeners
        new_config = reload_report.report(self.config, new_config)
        self.scoreboard.config_loaded(True, time.time())
        self._reconfigure_logging(new_config)
        self.config = new_config
        self.sizing = fitting.workers_for(new_config)  # a quota may have changed too
        self.desired = self.sizing.count
        self._fit_the_machine(announce=True)
        self.generation += 1
        self._move(MasterPhase.RELOADING)
        self._publish_master()

    def _finish_generation_switch(self) -> None:
        """Once every new worker serves, the older generations drain and leave."""
        if not self.phase.switching:
            return
        current = self._current()
        if len(current) < self.desired or any(
            self.scoreboard.slot(w.slot).state == State.BOOTING for w in current
        ):
            return
        for worker in list(self.workers.values()):
            if worker.generation < self.generation:
                self._retire(worker, limit=self.config.reload_limit)
        reloaded = self.phase is MasterPhase.RELOADING
        self._move(MasterPhase.RUNNING)
        log.info(
            "generation %d serving with %d worker(s); retiring the previous one",
            self.generation,
            len(current),
        )
        if reloaded:
            self.scoreboard.count_event(MasterCounter.RELOADS_OK)
        self.hooks.on_ready(self)

    def scale(self, count: int) -> None:
        if self.phase is MasterPhase.STOPPING:
            return
        count = max(1, min(count, MAX_WORKERS))
        log.info("scaling from %d to %d worker(s)", self.desired, count)
        self.desired = count
        surplus = sorted(self._current(), key=lambda w: w.worker_id)[count:]
        for worker in surplus:
            self._retire(worker, limit=self.config.reload_limit)

    def _read_scoreboard(self) -> None:
        """What the current workers said: ready, or asking to be replaced (recycling)."""
        for worker in self._current():
            state = self.scoreboard.slot(worker.slot).state
            if worker.phase is WorkerPhase.BOOTING and state != State.BOOTING:
                worker.move(WorkerPhase.SERVING)
            if state == State.RETIRING and worker.phase in (
                WorkerPhase.BOOTING,
                WorkerPhase.SERVING,
            ):
                worker.move(WorkerPhase.REPLACING)
                log.info("recycling worker %d (pid %d)", worker.worker_id, worker.pid)

    def _recycle_replaced_workers(self) -> None:
        """Workers being replaced drain once enough others serve (their successors)."""
        current = self._current()
        waiting = [w for w in current if w.phase is WorkerPhase.REPLACING]
        if not waiting:
            return
        serving = [
            w
            for w in current
            if w.phase is not WorkerPhase.REPLACING
            and self.scoreboard.slot(w.slot).state == State.READY
        ]
        if len(serving) >= self.desired:
            for worker in waiting:
                self.scoreboard.count_event(MasterCounter.RESTARTS_RECYCLED)
                self._retire(worker)

    def _reconfigure_logging(self, new_config: Config) -> None:
        if self._log_settings(new_config) != self._log_settings(self.config):
            try:
                logs.setup_logging(*self._log_settings(new_config))
            except EchodError as exc:
                log.error("reload: %s; logging stays as it was", exc)

    def _log_settings(self, config: Config) -> tuple[str, str, str, str]:
        level, log_file, log_format, access_log = logs.settings_of(config)
        return level, log_file or self.default_log_file, log_format, access_log

    # -- in-place upgrade --------------------------------------------------------------
    def _handoff(self) -> Handoff:
        return Handoff.of(
            self.listeners,
            self.pidfile,
            self.alive_read,
            self.alive_write,
            generation=self.generation,
            desired=self.desired,
            workers=[
                AdoptedWorker(w.pid, w.worker_id, w.generation, w.dismissed, w.started)
                for w in self.workers.values()
            ],
            helpers={helper.name: helper.handoff_fds() for helper in self.helpers},
        )

    def _upgrade_blocker(self) -> str | None:
        """Why the new image could not take over: it re-opens the pidfile and the
        scoreboard by path, and exits at once if they are gone (the runtime
        directory deleted, by a /tmp cleaner or by hand), taking the service down."""
        for what, path, present in (
            ("pidfile", self.pidfile.path, self.pidfile.in_place()),
            ("scoreboard", self.scoreboard.path, os.path.isfile(self.scoreboard.path)),
        ):
            if not present:
                return (
                    f"the {what} {path} was removed or replaced while echod ran; "
                    "restart echod to re-create it"
                )
        return None

    def _before_exec(self) -> None:
        for helper in self.helpers:
            helper.before_exec()

    # -- stopping ------------------------------------------------------------------
    def stop(self, graceful: bool) -> None:
        self.upgrade.abandon(self.children.kill)  # an exec now would lose the stop
        stopping = self.phase is MasterPhase.STOPPING
        if stopping and graceful:
            return
        if graceful and self._delay_shutdown():
            return
        self._stop_now(graceful)

    def _stop_now(self, graceful: bool) -> None:
        stopping = self.phase is MasterPhase.STOPPING
        kind = "graceful" if graceful else "fast"
        log.info("%s stop: closing listeners, %d worker(s) to finish", kind, len(self.workers))
        if not stopping:
            self.scoreboard.set_master_status(MasterStatus.STOPPING)
            self.hooks.on_stopping(self)
            self._move(MasterPhase.STOPPING)
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        grace = self.config.graceful_timeout + 1.0 if graceful else FAST_STOP_GRACE
        deadline = time.monotonic() + grace
        self.stop_deadline = min(self.stop_deadline, deadline) if self.stop_deadline else deadline
        for worker in self.workers.values():
            self._retire(worker, graceful)  # a fast stop overrides a graceful one

    def _delay_shutdown(self) -> bool:
        """TERM with shutdown_delay: stay up, serving but not ready, so that balancers
        and Kubernetes take this instance out before its listeners close. True while
        the delay runs (a second TERM changes nothing; INT and QUIT end it at once)."""
        if self.phase is MasterPhase.SHUTTING_DOWN:
            return True  # the tick ends the delay
        delay = self.config.shutdown_delay
        if delay <= 0:
            return False
        self._move(MasterPhase.SHUTTING_DOWN)
        self.shutdown_ends = time.monotonic() + delay
        self.scoreboard.set_shutdown_ends(self.shutdown_ends)  # echoctl stop waits for it
        self.scoreboard.set_master_status(MasterStatus.SHUTTING_DOWN)
        log.info("shutting down: not ready, still serving for %g s (shutdown_delay)", delay)
        self.hooks.on_shutting_down(self)
        return True

    def _cleanup(self) -> None:
        for helper in self.helpers:
            helper.stop()
        for listener in self.listeners:
            listener.close()
        self.scoreboard.unlink()
        log.info("echod stopped")

    # -- bits ------------------------------------------------------------------------
    def _announce_listeners(self) -> None:
        for listener in self.listeners:
            log.info("listening on %s", listener.bound)

    def _announce_ready_once(self) -> None:
        if self.ready_announced:
            return
        current = self._current()
        if len(current) < self.desired or any(
            self.scoreboard.slot(w.slot).state != State.READY for w in current
        ):
            return
        self.ready_announced = True
        self.scoreboard.set_master_status(MasterStatus.SERVING)
        log.info("echod %s ready: %d worker(s) serving", self.version, len(current))
        self.hooks.on_ready(self)

    def _publish_master(self) -> None:
        self.scoreboard.set_master(
            pid=self.pid,
            generation=self.generation,
            code_started=self.code_started,
            version=self.version,
        )

    def _signal_workers(self, signum: signal.Signals) -> None:
        for worker in self.workers.values():
            self.children.kill(worker.pid, signum)

    def serving_workers(self) -> int:
        return sum(
            1
            for w in self.workers.values()
            if self.scoreboard.slot(w.slot).state in (State.READY, State.RETIRING)
        )
