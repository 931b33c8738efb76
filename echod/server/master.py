"""The master: binds once, forks workers, and supervises them.

Its loop is the whole story: wait for a signal or the next timer, handle what
arrived, check on the workers, repeat. Signal handlers never do work; they
only wake the loop (see ``signals``). Workers are tracked in the master's own
table and on the shared scoreboard, where they publish heartbeats and counters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from echod import exitcodes, logs, procname
from echod.config import Config
from echod.errors import EchodError
from echod.limits.admission import SharedLimits
from echod.pidfile import PidFile
from echod.scoreboard import MasterCounter, Scoreboard, State, WorkerSlot
from echod.server.listeners import Listener, reconcile
from echod.server.signals import SignalQueue, blocked
from echod.server.upgrade import (
    PREFLIGHT_TIMEOUT,
    AdoptedWorker,
    Handoff,
    Preflight,
    exec_new_image,
)
from echod.server.worker import WorkerIdentity, start_worker

log = logging.getLogger("echod.master")

MASTER_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                  signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2)
ABORT_GRACE = 1.0  # seconds between SIGABRT (stack dump) and SIGKILL for a hung worker
FAST_STOP_GRACE = 2.0  # seconds workers get to exit on a fast stop before SIGKILL
YOUNG_DEATH = 5.0  # a worker dying younger than this was probably failing at boot
MAX_BACKOFF = 10.0
IDLE_TICK = 1.0
BUSY_TICK = 0.1
MEMORY_SAMPLE_INTERVAL = 3.0  # seconds between USS samples for max_worker_memory


@dataclass
class WorkerProcess:
    pid: int
    worker_id: int
    generation: int
    started: float
    retiring: bool = False  # told to drain (TERM sent)
    retire_deadline: float = 0.0
    replacement_requested: bool = False
    abort_sent_at: float = 0.0

    @property
    def slot(self) -> int:
        return self.worker_id - 1


@dataclass
class Hooks:
    """What the layers around the master (systemd, daemon launcher) want to hear."""

    on_ready: Callable[[Master], None] = lambda master: None
    on_reloading: Callable[[Master], None] = lambda master: None
    on_stopping: Callable[[Master], None] = lambda master: None
    on_tick: Callable[[Master], None] = lambda master: None


class Helper(Protocol):
    """A process the master keeps running beside the workers (the metrics endpoint)."""

    def supervise(self, master: Master, now: float) -> None:
        """Every loop iteration: start (or restart) the process when needed."""

    def child_exited(self, pid: int, status: int) -> bool:
        """A child that is not a worker was reaped; return True if it was ours."""
        return False

    def close_in_child(self) -> None:
        """In a freshly forked worker: close what the helper holds open."""

    def stop(self) -> None:
        """The master is leaving."""

    def listeners(self) -> list[Listener]:
        """Sockets the helper holds, to hand over across an in-place upgrade."""
        return []

    def before_exec(self) -> None:
        """The master is about to re-execute itself: stop the helper's process."""


@dataclass
class Master:
    config: Config
    listeners: list[Listener]
    scoreboard: Scoreboard
    load_config: Callable[[], Config]
    pidfile: PidFile
    hooks: Hooks = field(default_factory=Hooks)
    close_in_worker: Callable[[], None] = lambda: None
    version: str = ""
    code_started: float = 0.0
    handoff: Handoff | None = None  # set when this image was started by an upgrade
    helpers: list[Helper] = field(default_factory=list)
    default_log_file: str = ""  # where logs go when the config names no file (daemon mode)
    # created here, before any fork, so that every worker maps the same pages
    limits: SharedLimits = field(default_factory=SharedLimits)

    def __post_init__(self) -> None:
        self.pid = os.getpid()
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 1
        self.desired = self.config.workers
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = exitcodes.OK
        self.ready_announced = False
        self.reload_pending = False
        self.boot_failures: dict[int, int] = {}
        self.respawn_at: dict[int, float] = {}
        self.preflight: Preflight | None = None
        self.switch_reason = "reload"  # what the pending generation switch is for
        self.next_memory_sample = 0.0
        if self.handoff is None:
            self.alive_read, self.alive_write = os.pipe2(os.O_CLOEXEC)
        else:
            self._adopt(self.handoff)
        self.signals = SignalQueue(MASTER_SIGNALS)
        # an upgrade exec'd us with these blocked; our handlers are in place now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)

    def _adopt(self, handoff: Handoff) -> None:
        """After an in-place upgrade: take over the previous image's workers."""
        self.alive_read, self.alive_write = handoff.alive_read, handoff.alive_write
        os.set_inheritable(self.alive_read, False)
        os.set_inheritable(self.alive_write, False)
        now = time.monotonic()
        for adopted in handoff.workers:
            worker = WorkerProcess(adopted.pid, adopted.worker_id, adopted.generation, now)
            if adopted.retiring:  # was draining already: give it a fresh deadline
                worker.retiring = True
                worker.retire_deadline = now + self.config.graceful_timeout + 1.0
            self.workers[adopted.pid] = worker
        self.generation = handoff.generation + 1
        self.desired = handoff.desired
        self.reload_pending = True  # old workers retire once the new generation serves
        self.switch_reason = "upgrade"
        self.ready_announced = True
        self.scoreboard.count_event(MasterCounter.UPGRADES_OK)
        log.info("upgraded in place to echod %s: adopted %d worker(s) of generation %d; "
                 "starting generation %d", self.version, len(handoff.workers),
                 handoff.generation, self.generation)

    # -- the story ---------------------------------------------------------------
    def run(self) -> int:
        procname.set_title(f"master ({', '.join(str(a) for a in self.config.bind)})")
        self._publish_master()
        self._announce_listeners()
        self._supervise(time.monotonic())  # the first workers start now, not a tick later
        while True:
            for signum in self._wait_for_signals(self._next_tick()):
                self._handle_signal(signum)
            self._reap()
            if self.stopping and not self.workers:
                break
            self._supervise(time.monotonic())
        self._cleanup()
        return self.exit_code

    def _wait_for_signals(self, timeout: float) -> list[signal.Signals]:
        try:
            readable, _, _ = select.select([self.signals], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            readable = []
        return self.signals.drain() if readable else []

    def _next_tick(self) -> float:
        busy = self.stopping or self.reload_pending or not self.ready_announced or \
            self.preflight is not None or any(
            w.retiring or w.abort_sent_at or w.replacement_requested
            for w in self.workers.values()) or len(self._current()) < self.desired
        return BUSY_TICK if busy else IDLE_TICK

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
                self.upgrade()

    def _supervise(self, now: float) -> None:
        self._kill_hung_workers(now)
        self._enforce_retire_deadlines(now)
        if self.preflight is not None:
            self._watch_preflight(now)
        if not self.stopping:
            self._sample_memory(now)
            self._recycle_retiring_workers()
            self._spawn_missing(now)
            self._finish_generation_switch()
            self._announce_ready_once()
        for helper in self.helpers:
            helper.supervise(self, now)
        self.hooks.on_tick(self)

    # -- spawning ------------------------------------------------------------------
    def _current(self) -> list[WorkerProcess]:
        """Workers of the current generation that are not on their way out."""
        return [w for w in self.workers.values()
                if w.generation == self.generation and not w.retiring]

    def _spawn_missing(self, now: float) -> None:
        missing = self.desired - sum(1 for w in self._current() if not w.replacement_requested)
        for _ in range(missing):
            worker_id = self._free_worker_id()
            if now < self.respawn_at.get(worker_id, 0.0):
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
        # Signals stay blocked across fork() so none is lost or handled by the
        # master's handlers in the child before the worker installs its own.
        with blocked(MASTER_SIGNALS):
            pid = os.fork()
            if pid == 0:
                self._become_worker(identity)
        self.scoreboard.set_pid(slot, pid)
        worker = WorkerProcess(pid, worker_id, self.generation, time.monotonic())
        self.workers[pid] = worker
        log.info("started worker %d (pid %d, generation %d)", worker_id, pid, self.generation)
        return worker

    def _become_worker(self, identity: WorkerIdentity) -> None:
        try:
            self.signals.close()
            os.close(self.alive_write)
            self.close_in_worker()
            for helper in self.helpers:
                helper.close_in_child()
            slot = WorkerSlot(self.scoreboard, identity.worker_id - 1)
            start_worker(self.config, self.listeners, slot, identity, self.alive_read,
                         self.limits)
        except BaseException:
            log.exception("worker %d failed to start", identity.worker_id)
        os._exit(exitcodes.WORKER_BOOT_FATAL)

    # -- reaping -------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.preflight is not None and pid == self.preflight.pid:
                self._on_preflight_exit(status)
                continue
            worker = self.workers.pop(pid, None)
            if worker is None:
                for helper in self.helpers:
                    if helper.child_exited(pid, status):
                        break
                continue  # some other helper child
            self._on_worker_exit(worker, status)

    def _on_worker_exit(self, worker: WorkerProcess, status: int) -> None:
        now = time.monotonic()
        lifetime = now - worker.started
        logs.report_stack_dump(os.path.dirname(self.config.pidfile_path), worker.pid,
                               f"worker {worker.worker_id}")
        self.scoreboard.fold_into_retired(worker.slot)
        self.scoreboard.release(worker.slot)
        # its connections are gone, however it died: stop counting them against the limits
        self.limits.forget_worker(worker.slot, (w.slot for w in self.workers.values()))
        how = _describe_exit(status)
        expected = worker.retiring or self.stopping
        if expected:
            log.info("worker %d (pid %d) %s", worker.worker_id, worker.pid, how)
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == exitcodes.WORKER_BOOT_FATAL:
            self.scoreboard.count_event(MasterCounter.RESTARTS_BOOT_FAILED)
            self._on_boot_failure(worker)
            return
        self.scoreboard.count_event(MasterCounter.RESTARTS_TIMEOUT if worker.abort_sent_at
                                    else MasterCounter.RESTARTS_CRASHED)
        reason = "after worker_timeout" if worker.abort_sent_at else "unexpectedly"
        log.error("worker %d (pid %d) %s %s after %.1fs; replacing it", worker.worker_id,
                  worker.pid, how, reason, lifetime)
        if lifetime < YOUNG_DEATH and not worker.abort_sent_at:
            failures = self.boot_failures.get(worker.worker_id, 0) + 1
            self.boot_failures[worker.worker_id] = failures
            delay = min(0.1 * 2 ** (failures - 1), MAX_BACKOFF)
            self.respawn_at[worker.worker_id] = now + delay
            if failures > 1:
                log.warning("worker %d keeps dying young (%d in a row): next start in %.1fs",
                            worker.worker_id, failures, delay)
        else:
            self.boot_failures.pop(worker.worker_id, None)
            self.respawn_at.pop(worker.worker_id, None)

    def _on_boot_failure(self, worker: WorkerProcess) -> None:
        older = [w for w in self.workers.values() if w.generation < worker.generation]
        if worker.generation == self.generation and older and self.reload_pending:
            log.error("reload failed: workers of generation %d cannot start (see above); "
                      "generation %d keeps serving", worker.generation, self.generation - 1)
            self._abandon_generation()
            return
        log.critical("worker %d (pid %d) cannot start (see the error above); stopping echod "
                     "instead of restarting it in a loop", worker.worker_id, worker.pid)
        self.exit_code = exitcodes.FAILURE
        self.stop(graceful=False)

    def _abandon_generation(self) -> None:
        for worker in self._current():
            self._retire(worker, graceful=False)
        self.generation -= 1
        self.desired = sum(1 for w in self._current())
        self.reload_pending = False
        self.hooks.on_ready(self)

    # -- timeouts ------------------------------------------------------------------
    def _kill_hung_workers(self, now: float) -> None:
        timeout = self.config.worker_timeout
        for worker in list(self.workers.values()):
            if worker.abort_sent_at:
                if now - worker.abort_sent_at >= ABORT_GRACE:
                    _kill(worker.pid, signal.SIGKILL)
                continue
            silent_for = now - self.scoreboard.slot(worker.slot).heartbeat
            if silent_for > timeout:
                log.error("worker %d (pid %d) silent for %.1fs (worker_timeout %gs): sending "
                          "SIGABRT for a stack dump, then SIGKILL", worker.worker_id, worker.pid,
                          silent_for, timeout)
                worker.abort_sent_at = now
                _kill(worker.pid, signal.SIGABRT)

    def _enforce_retire_deadlines(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.retiring and now >= worker.retire_deadline and not worker.abort_sent_at:
                log.warning("worker %d (pid %d) did not finish in time: killing it",
                            worker.worker_id, worker.pid)
                worker.abort_sent_at = now  # SIGKILL follows; no second warning
                _kill(worker.pid, signal.SIGKILL)
        if self.stopping and now >= self.stop_deadline:
            for worker in self.workers.values():
                _kill(worker.pid, signal.SIGKILL)

    def _retire(self, worker: WorkerProcess, graceful: bool = True) -> None:
        if worker.retiring:
            return
        worker.retiring = True
        grace = self.config.graceful_timeout + 1.0 if graceful else FAST_STOP_GRACE
        worker.retire_deadline = time.monotonic() + grace
        _kill(worker.pid, signal.SIGTERM if graceful else signal.SIGQUIT)

    # -- reload, scaling, recycling ------------------------------------------------
    def reload(self) -> None:
        if self.stopping:
            return
        log.info("reloading configuration")
        self.hooks.on_reloading(self)
        try:
            new_config = self.load_config()
            change = reconcile(self.listeners, new_config.addresses, new_config.backlog)
        except EchodError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.scoreboard.count_event(MasterCounter.RELOADS_FAILED)
            self.hooks.on_ready(self)
            return
        for listener in change.opened:
            log.info("listening on %s", listener.bound)
        for listener in change.removed:
            log.info("no longer listening on %s", listener.bound)
            listener.close()
        self.listeners = change.listeners
        if self._log_settings(new_config) != self._log_settings(self.config):
            try:
                logs.setup_logging(*self._log_settings(new_config))
            except EchodError as exc:
                log.error("reload: %s; logging stays as it was", exc)
        self.config = new_config
        self.desired = new_config.workers
        self.generation += 1
        self.reload_pending = True
        self.switch_reason = "reload"
        self._publish_master()

    def _finish_generation_switch(self) -> None:
        """Once every new worker serves, the older generations drain and leave."""
        if not self.reload_pending:
            return
        current = self._current()
        if len(current) < self.desired or any(
                self.scoreboard.slot(w.slot).state == State.BOOTING for w in current):
            return
        for worker in list(self.workers.values()):
            if worker.generation < self.generation:
                self._retire(worker)
        self.reload_pending = False
        log.info("generation %d serving with %d worker(s); retiring the previous one",
                 self.generation, len(current))
        if self.switch_reason == "reload":
            self.scoreboard.count_event(MasterCounter.RELOADS_OK)
        self.hooks.on_ready(self)

    def scale(self, count: int) -> None:
        if self.stopping:
            return
        count = max(1, min(count, 512))
        log.info("scaling from %d to %d worker(s)", self.desired, count)
        self.desired = count
        surplus = sorted(self._current(), key=lambda w: w.worker_id)[count:]
        for worker in surplus:
            self._retire(worker)

    def _recycle_retiring_workers(self) -> None:
        """A worker asked to be replaced (recycling): start its successor, then retire it."""
        for worker in list(self.workers.values()):
            if worker.retiring or worker.generation != self.generation:
                continue
            state = self.scoreboard.slot(worker.slot).state
            if state == State.RETIRING and not worker.replacement_requested:
                worker.replacement_requested = True
                log.info("recycling worker %d (pid %d)", worker.worker_id, worker.pid)
        waiting = [w for w in self._current() if w.replacement_requested]
        if not waiting:
            return
        serving = [w for w in self._current() if not w.replacement_requested
                   and self.scoreboard.slot(w.slot).state == State.READY]
        if len(serving) >= self.desired:
            for worker in waiting:
                self.scoreboard.count_event(MasterCounter.RESTARTS_RECYCLED)
                self._retire(worker)

    def _log_settings(self, config: Config) -> tuple[str, str, str, str]:
        level, log_file, log_format, access_log = logs.settings_of(config)
        return level, log_file or self.default_log_file, log_format, access_log

    def _sample_memory(self, now: float) -> None:
        """Recycle workers whose unique memory (USS) exceeds max_worker_memory."""
        limit = self.config.max_worker_memory
        if not limit or now < self.next_memory_sample:
            return
        self.next_memory_sample = now + MEMORY_SAMPLE_INTERVAL
        for worker in self._current():
            if worker.replacement_requested:
                continue
            try:
                uss = psutil.Process(worker.pid).memory_full_info().uss
            except psutil.Error:
                continue
            if uss > limit:
                log.info("recycling worker %d (pid %d): memory %d bytes > max_worker_memory "
                         "%d", worker.worker_id, worker.pid, uss, limit)
                worker.replacement_requested = True

    # -- in-place upgrade --------------------------------------------------------------
    def upgrade(self) -> None:
        if self.stopping or self.preflight is not None:
            log.warning("upgrade ignored: %s", "stopping" if self.stopping
                        else "an upgrade is already under way")
            return
        log.info("upgrade requested: checking that the installed code and config load")
        self.hooks.on_reloading(self)
        try:
            self.preflight = Preflight.start(time.monotonic())
        except OSError as exc:
            log.error("upgrade aborted: cannot run the pre-flight check: %s", exc.strerror)
            self.scoreboard.count_event(MasterCounter.UPGRADES_FAILED)
            self.hooks.on_ready(self)

    def _watch_preflight(self, now: float) -> None:
        assert self.preflight is not None
        self.preflight.collect_output()
        if now - self.preflight.started > PREFLIGHT_TIMEOUT:
            log.error("upgrade pre-flight hangs after %.0fs: killing it", PREFLIGHT_TIMEOUT)
            _kill(self.preflight.pid, signal.SIGKILL)

    def _on_preflight_exit(self, status: int) -> None:
        preflight, self.preflight = self.preflight, None
        assert preflight is not None
        preflight.finish(status)
        if not preflight.succeeded or self.stopping:
            log.error("upgrade aborted, everything keeps running as it was: the pre-flight "
                      "check %s: %s", _describe_exit(status), preflight.summary)
            self.scoreboard.count_event(MasterCounter.UPGRADES_FAILED)
            if not self.stopping:
                self.hooks.on_ready(self)
            return
        handoff = Handoff(
            listener_fds={str(listener.address): listener.fileno()
                          for listener in self.listeners},
            pidfile_fd=self.pidfile.keep_across_exec(),
            alive_read=self.alive_read,
            alive_write=self.alive_write,
            generation=self.generation,
            desired=self.desired,
            workers=[AdoptedWorker(w.pid, w.worker_id, w.generation, w.retiring)
                     for w in self.workers.values()],
            activated=[str(lst.address) for lst in self.listeners if lst.activated],
        )
        for helper in self.helpers:
            for listener in helper.listeners():
                handoff.metrics_bind = str(listener.address)
                handoff.metrics_fd = listener.fileno()
        log.info("upgrade: pre-flight passed; re-executing in place (pid %d)", self.pid)
        logs.flush()
        keep = [*handoff.listener_fds.values(), handoff.pidfile_fd, self.alive_read,
                self.alive_write, *([handoff.metrics_fd] if handoff.metrics_bind else [])]
        for helper in self.helpers:
            helper.before_exec()
        try:
            exec_new_image(handoff, keep, MASTER_SIGNALS)
        except OSError as exc:
            log.error("upgrade aborted: exec failed: %s", exc.strerror)
            self.scoreboard.count_event(MasterCounter.UPGRADES_FAILED)
            self.hooks.on_ready(self)

    # -- stopping ------------------------------------------------------------------
    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return
        kind = "graceful" if graceful else "fast"
        log.info("%s stop: closing listeners, %d worker(s) to finish", kind, len(self.workers))
        if not self.stopping:
            self.hooks.on_stopping(self)
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        grace = self.config.graceful_timeout + 1.0 if graceful else FAST_STOP_GRACE
        deadline = time.monotonic() + grace
        self.stop_deadline = min(self.stop_deadline, deadline) if self.stop_deadline else deadline
        for worker in self.workers.values():
            worker.retiring = False  # re-signal: a fast stop overrides a graceful one
            self._retire(worker, graceful)

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
                self.scoreboard.slot(w.slot).state != State.READY for w in current):
            return
        self.ready_announced = True
        log.info("echod %s ready: %d worker(s) serving", self.version, len(current))
        self.hooks.on_ready(self)

    def _publish_master(self) -> None:
        self.scoreboard.set_master(pid=self.pid, generation=self.generation,
                                   code_started=self.code_started, version=self.version)

    def _signal_workers(self, signum: signal.Signals) -> None:
        for worker in self.workers.values():
            _kill(worker.pid, signum)

    def serving_workers(self) -> int:
        return sum(1 for w in self.workers.values()
                   if self.scoreboard.slot(w.slot).state in (State.READY, State.RETIRING))


def _kill(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by {name}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    return "exited" if code == 0 else f"exited with code {code}"

