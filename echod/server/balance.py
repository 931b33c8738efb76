"""Which worker takes the next connection: load-aware accept balancing.

Every worker waits on the shared listeners with ``EPOLLEXCLUSIVE``, and the
kernel wakes the first waiter in the listener's wait queue, in registration
order. Left alone, the same worker is woken for nearly every connection. Two
moves turn that queue into an even, load-aware spread:

* **Rotate.** After accepting, a worker re-registers the listener, which puts
  it at the back of the queue: idle workers are woken in turn.
* **Stand aside.** A worker holding more than its share (more than the least
  loaded peer plus a small slack) leaves the queue *before* it is woken again,
  and rejoins once the others caught up. A worker that is woken always takes
  what woke it: declining would leave that connection queued until the next
  arrival wakes someone else.

The decision reads the peers' open connections from the scoreboard, where each
worker writes its own count on every accept and close (one 4-byte store). The
last worker that listens never stands aside (checked under a lock on the
scoreboard file, waited for briefly) without first waking a peer that holds less,
and a peer whose heartbeat is late counts as neither listening nor least loaded.
A worker standing aside looks again on each of its own closes, every
``ASIDE_RECHECK`` seconds, and at once when the last listener, over its own
share in turn, nudges it (``NUDGE``) and steps aside itself: in a burst the
queue is handed on within a scheduling delay.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from enum import IntEnum

from echod.scoreboard import WorkerSlot

ASIDE_RECHECK = 0.01  # seconds between looks while standing aside
NUDGE = signal.SIGURG  # "look again": ignored by default, so a stray one is harmless
LOCK_PATIENCE = 0.05  # seconds to wait for the lock before staying in the queue
LOCK_RETRY_AFTER = 1.0  # after such a wait, seconds of not asking (its holder may be hung)


class AcceptState(IntEnum):
    """What a worker does about the shared listeners, as its peers see it."""

    OFF = 0  # not accepting at all (booting, draining, full, out of descriptors)
    LISTENING = 1  # in the listeners' wait queues
    ASIDE = 2  # could accept, but holds more than its share: left the queues for now


def allowance(least_loaded_peer: int) -> int:
    """How many connections a worker may hold before it stands aside.

    One above the least loaded peer, and 1/16 more as numbers grow, so that
    churning short connections do not make workers leave and rejoin each time.
    """
    return least_loaded_peer + 1 + least_loaded_peer // 16


class AcceptBalancer:
    """A worker's view of its peers' load, and its own place in the queue."""

    def __init__(self, slot: WorkerSlot, heartbeat_interval: float) -> None:
        self.slot = slot
        # A peer silent this long is hung (or dying): it neither takes connections
        # nor counts as the least loaded, so nobody stands aside for it.
        self.silent_after = 2 * heartbeat_interval + 0.25
        self.state = AcceptState.OFF
        self.peers: list[int] = []  # scoreboard offsets of the other workers' slots
        self.roster = -1  # the scoreboard's roster sequence when peers was read
        self.lock_fd = -1
        self.lock_wedged_until = 0.0  # monotonic: the lock was not to be had; stay until then

    def open(self) -> None:
        """Open the scoreboard file for the "last listener" lock (in the worker)."""
        with contextlib.suppress(OSError):  # without it, ASIDE_RECHECK still bounds a wait
            self.lock_fd = os.open(self.slot.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

    def has_peers(self) -> bool:
        roster = self.slot.roster()
        if roster != self.roster:
            self.roster = roster
            self.peers = self.slot.peer_offsets()
        return bool(self.peers)

    def set_open(self, count: int) -> None:
        self.slot.set_active(count)

    def set_state(self, state: AcceptState) -> None:
        self.state = state
        self.slot.set_accept_state(state)

    def _peer_loads(self) -> tuple[int | None, int, list[int]]:
        """Fewest open connections among peers able to accept, how many of them
        listen, and the pids of those standing aside."""
        self.has_peers()
        least: int | None = None
        listening = 0
        aside: list[int] = []
        read = self.slot.peer_load
        silent_since = time.monotonic() - self.silent_after
        for offset in self.peers:
            pid, state, heartbeat, active = read(offset)
            if state == AcceptState.OFF or heartbeat < silent_since:
                continue
            if state == AcceptState.LISTENING:
                listening += 1
            elif pid > 0:
                aside.append(pid)
            if least is None or active < least:
                least = active
        return least, listening, aside

    def accept_budget(self, open_connections: int, batch: int) -> int:
        """How many to accept now: what woke us, and more only up to our share."""
        least = self._peer_loads()[0]
        if least is None:
            return batch
        return max(1, min(batch, allowance(least) - open_connections))

    def should_stand_aside(self, open_connections: int) -> bool:
        """Over our share: leave the queue, unless we are the last who can accept.

        Decided under the lock, so two workers cannot both see the other
        listening and leave together. The last listener over its share hands
        over instead: it nudges the peers standing aside (they hold less now),
        which rejoin as soon as they run; the queue holds what arrives meanwhile.
        """
        least = self._peer_loads()[0]
        if least is None or open_connections <= allowance(least):
            return False
        with self._locked() as locked:
            if not locked:  # a peer is deciding (or hung mid-decision): stay, decide later
                return False
            _, listening, aside = self._peer_loads()
            if not listening:
                if not aside:
                    return False
                for pid in aside:
                    with contextlib.suppress(OSError):
                        os.kill(pid, NUDGE)
            self.set_state(AcceptState.ASIDE)
        return True

    def should_rejoin(self, open_connections: int) -> bool:
        least, listening, _ = self._peer_loads()
        return least is None or not listening or open_connections <= allowance(least)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        """The "last listener" lock, or False if it cannot be had soon.

        Held for microseconds, so a short wait gets it even in a burst, when every
        worker decides at once. But a peer stopped while holding it (SIGSTOP, a
        debugger) must not stop us too: after LOCK_PATIENCE we stay in the queue,
        which is always a safe answer, and stop asking for a while.
        """
        if self.lock_fd < 0:
            yield True
            return
        now = time.monotonic()
        if now < self.lock_wedged_until or not self._try_lock(now + LOCK_PATIENCE):
            self.lock_wedged_until = max(self.lock_wedged_until, now + LOCK_RETRY_AFTER)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def _try_lock(self, deadline: float) -> bool:
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.0001)
