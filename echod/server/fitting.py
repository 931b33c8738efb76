"""Fitting the master to the machine, before it forks: how many workers, how many
descriptors each may open, how big the UDP receive buffers are.

Each says in the log what it found, once at start and again when a reload
changes it: an operator reading the start-up lines knows why echod runs 3
workers, or why a worker will pause accepting at 960 connections.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from echod.config import DEFAULT_UDP_RECEIVE_BUFFER, Config
from echod.server.listeners import Listener, size_receive_buffers
from echod.system.cpus import WorkerCount, worker_count
from echod.system.nofile import raise_nofile

log = logging.getLogger("echod.master")


def workers_for(config: Config) -> WorkerCount:
    """The configured count, or the CPUs echod may use (affinity, cgroup quota)."""
    return worker_count(config.workers)


def announce_workers(sizing: WorkerCount) -> None:
    log.info("%d worker(s): %s", sizing.count, sizing.why)


@dataclass
class DescriptorLimit:
    """The soft RLIMIT_NOFILE, raised for ``max_connections`` per worker."""

    warned_for: int = 0  # the max_connections last warned about: once, not every reload

    def fit(self, config: Config) -> None:
        plan = raise_nofile(config.max_connections)
        if plan.granted > plan.soft:
            log.info(
                "raised the open-file soft limit (RLIMIT_NOFILE) from %d to %d: "
                "max_connections %d per worker plus %d of its own",
                plan.soft,
                plan.granted,
                config.max_connections,
                plan.own,
            )
        if plan.fits or self.warned_for == config.max_connections:
            return
        self.warned_for = config.max_connections
        log.warning(
            "the open-file hard limit (RLIMIT_NOFILE) %d is too low for max_connections %d "
            "(a worker needs %d): each worker holds at most %d connection(s), then pauses "
            "accepting; raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower "
            "max_connections",
            plan.hard,
            config.max_connections,
            plan.wanted,
            plan.per_worker,
        )


def fit_receive_buffers(listeners: list[Listener], config: Config) -> None:
    asked = config.udp_receive_buffer
    granted = size_receive_buffers(listeners, asked)
    if granted is not None:
        # the default asks for more than many hosts allow: say so, without alarm
        level = logging.INFO if asked == DEFAULT_UDP_RECEIVE_BUFFER else logging.WARNING
        log.log(
            level,
            "udp_receive_buffer %d capped by the kernel at %d bytes (net.core.rmem_max);"
            " bursts beyond it are dropped and counted",
            asked,
            granted,
        )
