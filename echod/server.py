"""Start-up in the order that keeps errors on the user's terminal: pidfile lock,
bind, (detach), (drop privileges), scoreboard, then hand over to the master.
"""

from __future__ import annotations

import contextlib
import logging
import os

from echod import installed_version, logs
from echod.config import Config
from echod.errors import EchodError
from echod.listeners import open_listeners
from echod.master import Master
from echod.metrics_http import MetricsService
from echod.pidfile import PidFile
from echod.scoreboard import Scoreboard, scoreboard_path

log = logging.getLogger("echod")


def serve(config: Config, source: object, *, foreground: bool, code_started: float) -> int:
    """Run echod until it stops; return the exit code."""
    logs.setup_logging(*logs.settings_of(config))
    _make_runtime_dir(config.runtime_dir)
    pidfile = PidFile(config.pidfile_path)
    pidfile.acquire()  # a second instance fails here, before binding anything
    try:
        listeners = open_listeners(config.addresses, config.backlog)
        metrics = MetricsService.open(config.metrics_bind)  # a port in use: exit 69 here
        pidfile.write(os.getpid())
        scoreboard = Scoreboard.create(scoreboard_path(pidfile.path))
        master = Master(
            config=config,
            listeners=listeners,
            scoreboard=scoreboard,
            load_config=source.load,  # type: ignore[attr-defined]
            close_in_worker=lambda: os.close(pidfile.fd),
            version=installed_version(),
            code_started=code_started,
            helpers=[metrics],
        )
        return master.run()
    finally:
        pidfile.release()


def _make_runtime_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise EchodError(f"cannot create runtime directory {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):
        if not os.access(path, os.W_OK):
            raise EchodError(f"runtime directory {path} is not writable")
