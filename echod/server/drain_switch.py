"""The master's side of ``echoctl drain``: follow the request file (see
``echod.drainrequest``) and publish the state where /readyz, ``echoctl status``
and the metrics read it (the scoreboard's master flags)."""

from __future__ import annotations

import logging
import os

from echod.drainrequest import drain_request_path, requested, withdraw
from echod.scoreboard import MasterFlag, Scoreboard

log = logging.getLogger("echod.master")


class DrainSwitch:
    def __init__(self, pidfile: str, scoreboard: Scoreboard) -> None:
        self.path = drain_request_path(pidfile)
        self.scoreboard = scoreboard
        self.draining = False

    def forget_stale(self) -> None:
        """At a fresh start: a request left by an earlier run does not carry over (a
        restart serves again; HUP and USR2 keep the request and so the state)."""
        try:
            if withdraw(self.path):
                log.info("removed the drain request %s left by an earlier run", self.path)
        except OSError as exc:
            log.warning("cannot remove the stale drain request %s: %s", self.path, exc.strerror)

    def follow(self) -> bool:
        """Every tick: True when the state just changed."""
        wanted = requested(self.path, os.geteuid())
        if wanted == self.draining:
            return False
        self.draining = wanted
        self.scoreboard.set_master_flag(MasterFlag.DRAINING, wanted)
        if wanted:
            log.info("draining: /readyz answers 503; serving as before (echoctl undrain ends it)")
        else:
            log.info("drain ended: ready again")
        return True
