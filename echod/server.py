"""Start-up in the order that keeps errors on the user's terminal: pidfile lock,
bind, (detach), (drop privileges), scoreboard, then hand over to the master.

After an in-place upgrade the same function runs in the re-executed image: it
takes the pidfile, the sockets and the scoreboard over instead of creating them.
"""

from __future__ import annotations

import contextlib
import logging
import os

from echod import installed_version, logs
from echod.config import Config
from echod.errors import EchodError
from echod.listeners import Listener, adopt_sockets, open_listeners
from echod.master import Master
from echod.pidfile import PidFile
from echod.scoreboard import Scoreboard, scoreboard_path
from echod.upgrade import Handoff, take_handoff

log = logging.getLogger("echod")


def serve(config: Config, source: object, *, foreground: bool, code_started: float) -> int:
    """Run echod until it stops; return the exit code."""
    logs.setup_logging(config.log_level, config.log_file, config.log_format)
    handoff = take_handoff()
    if handoff is not None:
        pidfile = PidFile.adopt(config.pidfile_path, handoff.pidfile_fd)
        listeners = _take_over_listeners(config, handoff)
        scoreboard = Scoreboard.attach(scoreboard_path(pidfile.path))
    else:
        _make_runtime_dir(config.runtime_dir)
        pidfile = PidFile(config.pidfile_path)
        pidfile.acquire()  # a second instance fails here, before binding anything
        try:
            listeners = open_listeners(config.addresses, config.backlog)
        except BaseException:
            pidfile.release()
            raise
        pidfile.write(os.getpid())
        scoreboard = Scoreboard.create(scoreboard_path(pidfile.path))
    try:
        master = Master(
            config=config,
            listeners=listeners,
            scoreboard=scoreboard,
            load_config=source.load,  # type: ignore[attr-defined]
            pidfile=pidfile,
            close_in_worker=lambda: os.close(pidfile.fd),
            version=installed_version(),
            code_started=code_started,
            handoff=handoff,
        )
        return master.run()
    finally:
        pidfile.release()


def _take_over_listeners(config: Config, handoff: Handoff) -> list[Listener]:
    inherited = adopt_sockets(handoff.listener_fds)
    listeners = open_listeners(config.addresses, config.backlog, inherited)
    wanted = set(config.addresses)
    for address, sock in inherited.items():
        if address not in wanted:
            log.info("no longer listening on %s", address)
            sock.close()
    return listeners


def _make_runtime_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise EchodError(f"cannot create runtime directory {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):
        if not os.access(path, os.W_OK):
            raise EchodError(f"runtime directory {path} is not writable")
