"""The scoreboard: a file-backed shared memory map with one fixed slot per worker.

Modelled on Apache's prefork scoreboard. The master creates it before forking;
every worker writes only its own slot (heartbeat, state, counters) and the
master, ``echoctl status`` and the metrics endpoint read it. Being a file in
the runtime dir, it survives the master's in-place re-exec (the new image maps
the same file its old workers still write to) and outside tools can read it
without asking the master anything.

Every value is written as one copy of its packed bytes (:func:`_store`), never
with ``struct.pack_into``, which zeroes its destination before it packs: a
reader may see a counter one update old, which is fine for supervision and
statistics, but never a zero that was not written.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import stat
import struct
import time
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple

from echod import rundir

MAGIC = b"ECHODSB2"
MAX_SHUTDOWN_DELAY = 3600  # seconds; config.py enforces it, the header relies on it
# A fold takes microseconds, but a master descheduled mid-fold on a busy machine
# takes longer: a reader waits this long (seconds) before it settles for a read
# that may count the folding worker twice or not at all.
SNAPSHOT_PATIENCE = 2.0
MAX_SLOTS = 1040  # two generations of the maximum worker count, plus spare
NUM_COUNTERS = 32


class State(IntEnum):
    FREE = 0
    BOOTING = 1
    READY = 2
    DRAINING = 3
    RETIRING = 4  # asks the master for a replacement (recycling), still serving


class MasterStatus(IntEnum):
    """What the master is doing, for /healthz and /readyz. Zero (STARTING) until the
    master first says otherwise, so a header an older master wrote reads as that."""

    STARTING = 0  # booting, or re-executed and not yet serving
    SERVING = 1  # supervising workers, taking new clients (reloads and upgrades too)
    SHUTTING_DOWN = 2  # TERM received: still serving for shutdown_delay, not ready
    STOPPING = 3  # listeners closed, connections finishing


class MasterFlag(IntFlag):
    """Bits of the master's flags byte (zero from an older image: none set)."""

    DRAINING = 1  # `echoctl drain`: /readyz 503, serving as before
    RELOAD_FAILED = 2  # the last reload's configuration did not load


class Counter(IntEnum):
    """Indices into a slot's counters. Append only: the layout is shared with readers."""

    ACCEPTED = 0
    BYTES_IN = 1
    BYTES_OUT = 2
    ERRORS = 3
    CLOSED_IDLE = 4
    ACCEPT_PAUSED_EMFILE = 5
    REJECTED_MAX_CONNECTIONS = 6
    UDP_RECEIVED = 7
    UDP_SENT = 8
    UDP_DROPPED_PORT = 9
    UDP_DROPPED_ADDRESS = 10
    UDP_DROPPED_RATE = 11
    UDP_BYTES_IN = 12
    UDP_BYTES_OUT = 13
    REJECTED_DENIED = 14
    REJECTED_PER_IP = 15
    REJECTED_TOTAL = 16
    CLOSED_LIFETIME = 17
    CLOSED_RESET = 18
    CLOSED_EOF = 19
    CLOSED_SHUTDOWN = 20
    ACCEPT_EMFILE = 21  # accept() failures by errno (the EMFILE family pauses accepting)
    ACCEPT_ENFILE = 22
    ACCEPT_ENOMEM = 23  # ENOMEM or ENOBUFS
    ACCEPT_ABORTED = 24  # ECONNABORTED or EPROTO: the client left before accept()
    ACCEPT_OTHER = 25
    UDP_DROPPED_RATE_TOTAL = 26  # over udp_rate_total (UDP_DROPPED_RATE: per source)
    # PROXY protocol headers from proxy_protocol_from sources, by outcome
    PROXY_PROXIED = 27  # a PROXY header: its client address is the client
    PROXY_LOCAL = 28  # v2 LOCAL, v1 UNKNOWN, or an unspecified family: the real peer stays
    PROXY_MALFORMED = 29  # closed: not a valid v1/v2 header
    PROXY_TIMEOUT = 30  # closed: incomplete after proxy_header_timeout
    PROXY_CLOSED_EARLY = 31  # the peer closed or reset before the header was complete


# Why a stream connection ended, by the counter its close bumps: the metrics'
# `reason` label and the access log's `reason` field.
CLOSE_REASONS: dict[Counter, str] = {
    Counter.CLOSED_EOF: "client_eof",
    Counter.CLOSED_IDLE: "idle_timeout",
    Counter.CLOSED_RESET: "reset",
    Counter.CLOSED_LIFETIME: "lifetime_limit",
    Counter.CLOSED_SHUTDOWN: "shutdown",
}


class MasterCounter(IntEnum):
    """Events only the master sees. Append only: the layout is shared with readers."""

    RESTARTS_CRASHED = 0  # a worker died unexpectedly
    RESTARTS_TIMEOUT = 1  # killed after worker_timeout
    RESTARTS_RECYCLED = 2  # max_connections_per_child / max_worker_memory
    RESTARTS_BOOT_FAILED = 3
    RELOADS_OK = 4
    RELOADS_FAILED = 5
    UPGRADES_OK = 6
    UPGRADES_FAILED = 7
    UDP_DROPS_UNTRACKED = 8  # kernel drops of sockets pushed out of the retired table
    RESTARTS_OOM = 9  # a worker killed by the kernel's OOM killer


# Kernel drops per UDP socket (SO_RXQ_OVFL: cumulative per socket, shared by all
# workers, kept across reloads and upgrades). Each worker publishes in its slot the
# latest count it saw per socket, as (socket inode, count) pairs; the master folds
# a reaped worker's pairs into the header's, keeping the maximum per socket. The
# figure of a socket is the maximum over the header and the live slots: each writer
# writes only its own slot, so it never goes backwards.
UDP_DROP_SOCKETS_PER_SLOT = 3
UDP_DROP_SOCKETS_RETIRED = 5
_SLOT_DROPS = struct.Struct(f"<{2 * UDP_DROP_SOCKETS_PER_SLOT}I")
_RETIRED_DROPS = struct.Struct(f"<{2 * UDP_DROP_SOCKETS_RETIRED}I")
_RETIRED_DROPS_OFFSET = 328


# 16 places, the last one taken by the last good config load (see _LAST_CONFIG_LOAD)
NUM_MASTER_COUNTERS = 15
# magic, master pid, generation, nslots, code started (wall), master started (wall),
# version, retired-worker totals (folded in by the master when a worker is reaped)
_HEADER = struct.Struct(f"<8siIIdd32s{NUM_COUNTERS}Q")
_MASTER_COUNTERS = struct.Struct(f"<{NUM_MASTER_COUNTERS}Q")
_MASTER_COUNTERS_OFFSET = 384
# Even: the retired totals and the slots agree; odd: a fold is under way. Readers
# that sum retired + live counters retry on change, so totals never go backwards.
_FOLD_SEQUENCE = struct.Struct("<Q")
_FOLD_SEQUENCE_OFFSET = 376
# Bumped whenever a slot is claimed or released, so that workers re-read who
# their peers are only when that changes (see echod.server.balance).
_ROSTER = struct.Struct("<I")
_ROSTER_OFFSET = 368
# The master's status and heartbeat (whole seconds of CLOCK_MONOTONIC, which is
# system-wide, so a reader compares it with its own time.monotonic()).
_MASTER_STATUS = struct.Struct("<B")
_MASTER_STATUS_OFFSET = 372
# SHUTTING_DOWN: when shutdown_delay ends, in whole seconds of CLOCK_MONOTONIC
# (rounded up) modulo 65535, plus 1 (enough as the delay is capped at an hour). It
# lives in what were the status's pad bytes: an older image wrote zeros there,
# which read as "not published", and reads nothing, so old and new images share
# a scoreboard.
_SHUTDOWN_ENDS = struct.Struct("<H")
_SHUTDOWN_ENDS_OFFSET = 374
# Flags only the master writes (see MasterFlag), in the status's second pad byte:
# an older image wrote zero there, "not draining, last reload fine".
_MASTER_FLAGS = struct.Struct("<B")
_MASTER_FLAGS_OFFSET = 373
# When the configuration last loaded successfully (wall clock, seconds): at start,
# at an upgrade, at each good reload. In the last of the 16 master-counter places.
_LAST_CONFIG_LOAD = struct.Struct("<d")
_LAST_CONFIG_LOAD_OFFSET = 504
_MASTER_HEARTBEAT = struct.Struct("<I")
_MASTER_HEARTBEAT_OFFSET = 324
HEADER_SIZE = 512
# pid, generation, state, worker id, started (wall), heartbeat (monotonic), active,
# drain timeout (see set_drain_timeout; the last 4 bytes were padding, zero = unset)
_SLOT_HEAD = struct.Struct("<iIBxHddI4x")
_DRAIN_TIMEOUT = struct.Struct("<f")
_DRAIN_TIMEOUT_OFFSET = 32
_COUNTERS = struct.Struct(f"<{NUM_COUNTERS}Q")
SLOT_SIZE = 320
FILE_SIZE = HEADER_SIZE + MAX_SLOTS * SLOT_SIZE
_HEARTBEAT_OFFSET = 4 + 4 + 1 + 1 + 2 + 8
_STATE_OFFSET = 8
_ACTIVE_OFFSET = _HEARTBEAT_OFFSET + 8
_ACCEPT_STATE_OFFSET = _STATE_OFFSET + 1  # pad byte after state: balance.AcceptState
# a peer's pid, accept state, heartbeat and open connections, read in one go
_PEER_LOAD = struct.Struct("<i5xB10xdI")

assert _HEADER.size <= _MASTER_HEARTBEAT_OFFSET
assert _MASTER_HEARTBEAT_OFFSET + _MASTER_HEARTBEAT.size <= _RETIRED_DROPS_OFFSET
assert _ROSTER_OFFSET + _ROSTER.size <= _MASTER_STATUS_OFFSET
assert _MASTER_STATUS_OFFSET + _MASTER_STATUS.size <= _MASTER_FLAGS_OFFSET
assert _MASTER_FLAGS_OFFSET + _MASTER_FLAGS.size <= _SHUTDOWN_ENDS_OFFSET
assert _SHUTDOWN_ENDS_OFFSET + _SHUTDOWN_ENDS.size <= _FOLD_SEQUENCE_OFFSET
assert _RETIRED_DROPS_OFFSET + _RETIRED_DROPS.size <= _ROSTER_OFFSET
assert _ROSTER_OFFSET + _ROSTER.size <= _FOLD_SEQUENCE_OFFSET
assert _PEER_LOAD.size == _ACTIVE_OFFSET + 4
assert _DRAIN_TIMEOUT_OFFSET + _DRAIN_TIMEOUT.size == _SLOT_HEAD.size
assert _FOLD_SEQUENCE_OFFSET + _FOLD_SEQUENCE.size <= _MASTER_COUNTERS_OFFSET
assert _MASTER_COUNTERS_OFFSET + _MASTER_COUNTERS.size <= _LAST_CONFIG_LOAD_OFFSET
assert _LAST_CONFIG_LOAD_OFFSET + _LAST_CONFIG_LOAD.size <= HEADER_SIZE
assert _SLOT_HEAD.size + _COUNTERS.size + _SLOT_DROPS.size <= SLOT_SIZE
_SLOT_DROPS_OFFSET = _SLOT_HEAD.size + _COUNTERS.size

_PID = struct.Struct("<i")  # a slot's first field: 0 = free
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_HEARTBEAT_ACTIVE = struct.Struct("<dI")

DropPairs = tuple[tuple[int, int], ...]  # (socket inode, drops), inode 0 = unused


def _store(buffer: mmap.mmap, layout: struct.Struct, offset: int, *values: object) -> None:
    """Write ``values`` into the shared map as one copy of their packed bytes.

    Not ``layout.pack_into``: CPython's packer zeroes the destination before it
    fills it in, and a reader in another process that lands in between sees
    zeros: a total that drops by a whole worker's count and comes back.
    """
    buffer[offset : offset + layout.size] = layout.pack(*values)


def _pairs(flat: tuple[int, ...]) -> DropPairs:
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2) if flat[i])


def _flat(pairs: DropPairs, size: int) -> list[int]:
    flat = [value for pair in pairs[:size] for value in pair]
    return flat + [0] * (2 * size - len(flat))


@dataclass
class SlotView:
    index: int
    pid: int
    generation: int
    state: State
    worker_id: int
    started: float
    heartbeat: float
    active: int
    counters: tuple[int, ...]
    udp_drops: DropPairs = ()

    def counter(self, which: Counter) -> int:
        return self.counters[which]


@dataclass
class MasterView:
    pid: int
    generation: int
    code_started: float
    master_started: float
    version: str
    retired: tuple[int, ...]
    events: tuple[int, ...] = ()
    udp_drops: DropPairs = ()
    status: MasterStatus = MasterStatus.STARTING
    heartbeat: int = 0  # whole seconds of time.monotonic(), 0 = never beat
    shutdown_ends: int = 0  # SHUTTING_DOWN only: see shutdown_delay_left()
    flags: int = 0  # MasterFlag bits
    last_config_load: float = 0.0  # wall clock; 0 = never published (an older image)

    @property
    def draining(self) -> bool:
        return bool(self.flags & MasterFlag.DRAINING)

    @property
    def last_reload_successful(self) -> bool:
        return not self.flags & MasterFlag.RELOAD_FAILED

    def shutdown_delay_left(self, now: float) -> float:
        """Seconds of shutdown_delay still to run; `now` from time.monotonic()."""
        if self.status is not MasterStatus.SHUTTING_DOWN:
            return 0.0
        if self.shutdown_ends == 0:
            return 0.0  # an older image: not published
        # The end is published rounded up to a whole second; `now` is not truncated
        # too, or the two roundings together could add up to 2 s.
        left = (self.shutdown_ends - 1 - now) % 65535
        return left if left <= MAX_SHUTDOWN_DELAY + 1 else 0.0  # else: passed


class Snapshot(NamedTuple):
    """The header and the slots in use, read between two folds (see
    :meth:`Scoreboard.snapshot`)."""

    master: MasterView
    slots: list[SlotView]

    def totals(self) -> list[int]:
        """Every counter summed over the retired workers and the live ones.

        The one place totals are added up: from a snapshot, a total never goes
        backwards, even while the master folds a reaped worker's counts in.
        """
        return [
            sum(column)
            for column in zip(
                self.master.retired, *(slot.counters for slot in self.slots), strict=True
            )
        ]

    def udp_drops_by_socket(self) -> dict[int, int]:
        """Kernel-dropped datagrams per UDP socket (by inode): the most any worker saw."""
        drops: dict[int, int] = {}
        for pairs in (self.master.udp_drops, *(slot.udp_drops for slot in self.slots)):
            for inode, count in pairs:
                drops[inode] = max(drops.get(inode, 0), count)
        return drops

    def udp_receive_buffer_drops(self) -> int:
        """Datagrams the kernel dropped on echod's UDP sockets (receive buffer full)."""
        untracked = self.master.events[MasterCounter.UDP_DROPS_UNTRACKED]
        return sum(self.udp_drops_by_socket().values()) + untracked


class Scoreboard:
    def __init__(self, path: str, buffer: mmap.mmap) -> None:
        self.path = path
        self.buffer = buffer

    # -- creation and attachment ------------------------------------------------
    @classmethod
    def create(cls, path: str) -> Scoreboard:
        """A fresh, zeroed scoreboard (replacing any stale one atomically)."""
        tmp = f"{path}.{os.getpid()}.tmp"
        # Never through a planted symlink, and certainly a fresh inode of ours.
        fd = rundir.create_exclusive(tmp, os.O_RDWR, 0o644)
        try:
            os.ftruncate(fd, FILE_SIZE)
            buffer = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.rename(tmp, path)
        finally:
            os.close(fd)
        board = cls(path, buffer)
        board._write_header(
            master_pid=os.getpid(),
            generation=0,
            code_started=0.0,
            master_started=time.time(),
            version="",
            retired=(0,) * NUM_COUNTERS,
        )
        return board

    @classmethod
    def attach(cls, path: str, writable: bool = True) -> Scoreboard:
        """Map an existing scoreboard (after an in-place upgrade, or to read it)."""
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: not an echod scoreboard (not a regular file)")
            if st.st_size < FILE_SIZE:
                raise ValueError(f"{path}: not an echod scoreboard (too small)")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            buffer = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        if buffer[:8] != MAGIC:
            buffer.close()
            raise ValueError(f"{path}: not an echod scoreboard")
        return cls(path, buffer)

    def close(self) -> None:
        self.buffer.close()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # e.g. privileges dropped: leave it, the next start replaces it
            logging.getLogger("echod").warning("cannot remove %s: %s", self.path, exc.strerror)

    # -- master-wide header -----------------------------------------------------
    def _write_header(
        self,
        *,
        master_pid: int,
        generation: int,
        code_started: float,
        master_started: float,
        version: str,
        retired: tuple[int, ...],
    ) -> None:
        _store(
            self.buffer,
            _HEADER,
            0,
            MAGIC,
            master_pid,
            generation,
            MAX_SLOTS,
            code_started,
            master_started,
            version.encode()[:32],
            *retired,
        )

    def master(self) -> MasterView:
        fields = _HEADER.unpack_from(self.buffer, 0)
        return MasterView(
            pid=fields[1],
            generation=fields[2],
            code_started=fields[4],
            master_started=fields[5],
            version=fields[6].rstrip(b"\0").decode(errors="replace"),
            retired=tuple(fields[7:]),
            events=_MASTER_COUNTERS.unpack_from(self.buffer, _MASTER_COUNTERS_OFFSET),
            udp_drops=_pairs(_RETIRED_DROPS.unpack_from(self.buffer, _RETIRED_DROPS_OFFSET)),
            status=_master_status(
                _MASTER_STATUS.unpack_from(self.buffer, _MASTER_STATUS_OFFSET)[0]
            ),
            heartbeat=_MASTER_HEARTBEAT.unpack_from(self.buffer, _MASTER_HEARTBEAT_OFFSET)[0],
            shutdown_ends=_SHUTDOWN_ENDS.unpack_from(self.buffer, _SHUTDOWN_ENDS_OFFSET)[0],
            flags=_MASTER_FLAGS.unpack_from(self.buffer, _MASTER_FLAGS_OFFSET)[0],
            last_config_load=self._last_config_load(),
        )

    def _last_config_load(self) -> float:
        return float(_LAST_CONFIG_LOAD.unpack_from(self.buffer, _LAST_CONFIG_LOAD_OFFSET)[0])

    def set_master_flag(self, flag: MasterFlag, on: bool) -> None:
        """The master alone writes the flags, so read-modify-write is safe."""
        (flags,) = _MASTER_FLAGS.unpack_from(self.buffer, _MASTER_FLAGS_OFFSET)
        flags = flags | flag if on else flags & ~flag
        _store(self.buffer, _MASTER_FLAGS, _MASTER_FLAGS_OFFSET, flags)

    def config_loaded(self, ok: bool, when: float) -> None:
        """A configuration load (start, upgrade, reload): `when` is kept only if `ok`."""
        if ok:
            _store(self.buffer, _LAST_CONFIG_LOAD, _LAST_CONFIG_LOAD_OFFSET, when)
        self.set_master_flag(MasterFlag.RELOAD_FAILED, not ok)

    def set_drain_timeout(self, index: int, seconds: float) -> None:
        """How long the worker in slot `index` may drain once told to (TERM): written
        by the master before the signal; inf = never forced, 0 = graceful_timeout."""
        _store(self.buffer, _DRAIN_TIMEOUT, self._offset(index) + _DRAIN_TIMEOUT_OFFSET, seconds)

    def set_master_status(self, status: MasterStatus) -> None:
        _store(self.buffer, _MASTER_STATUS, _MASTER_STATUS_OFFSET, status)

    def set_shutdown_ends(self, ends: float) -> None:
        """`ends` from time.monotonic(): published before the SHUTTING_DOWN status."""
        _store(self.buffer, _SHUTDOWN_ENDS, _SHUTDOWN_ENDS_OFFSET, math.ceil(ends) % 65535 + 1)

    def master_heartbeat(self, now: float) -> None:
        """`now` from time.monotonic(); the master beats on every pass of its loop."""
        _store(self.buffer, _MASTER_HEARTBEAT, _MASTER_HEARTBEAT_OFFSET, int(now) & 0xFFFFFFFF)

    def count_event(self, which: MasterCounter, amount: int = 1) -> None:
        offset = _MASTER_COUNTERS_OFFSET + 8 * which
        (value,) = _U64.unpack_from(self.buffer, offset)
        _store(self.buffer, _U64, offset, value + amount)

    def set_master(self, *, pid: int, generation: int, code_started: float, version: str) -> None:
        view = self.master()
        self._write_header(
            master_pid=pid,
            generation=generation,
            code_started=code_started,
            master_started=view.master_started,
            version=version,
            retired=view.retired,
        )

    def fold_into_retired(self, index: int) -> None:
        """Keep a reaped worker's totals so that counters survive restarts.

        The slot's counters move into the header in one step as readers see it
        (see :meth:`snapshot`): never counted twice, never missing.
        """
        sequence = self._fold_sequence()
        _store(self.buffer, _FOLD_SEQUENCE, _FOLD_SEQUENCE_OFFSET, sequence + 1)
        view = self.master()
        slot = self.slot(index)
        retired = tuple(a + b for a, b in zip(view.retired, slot.counters, strict=True))
        self._write_header(
            master_pid=view.pid,
            generation=view.generation,
            code_started=view.code_started,
            master_started=view.master_started,
            version=view.version,
            retired=retired,
        )
        _store(
            self.buffer, _COUNTERS, self._offset(index) + _SLOT_HEAD.size, *((0,) * NUM_COUNTERS)
        )
        self._fold_udp_drops(view, slot.udp_drops)
        _store(
            self.buffer,
            _SLOT_DROPS,
            self._offset(index) + _SLOT_DROPS_OFFSET,
            *_flat((), UDP_DROP_SOCKETS_PER_SLOT),
        )
        _store(self.buffer, _FOLD_SEQUENCE, _FOLD_SEQUENCE_OFFSET, sequence + 2)

    def _fold_udp_drops(self, view: MasterView, pairs: DropPairs) -> None:
        """Keep the maximum per socket; when the table is full, a socket that no live
        worker reports leaves it and its count moves to UDP_DROPS_UNTRACKED."""
        retired = dict(view.udp_drops)
        for inode, count in pairs:
            retired[inode] = max(retired.get(inode, 0), count)
        if len(retired) > UDP_DROP_SOCKETS_RETIRED:
            live = {inode for slot in self.slots() for inode, _ in slot.udp_drops}
            for inode in sorted(retired, key=lambda i: (i in live, i)):
                if len(retired) <= UDP_DROP_SOCKETS_RETIRED:
                    break
                self.count_event(MasterCounter.UDP_DROPS_UNTRACKED, retired.pop(inode))
        _store(
            self.buffer,
            _RETIRED_DROPS,
            _RETIRED_DROPS_OFFSET,
            *_flat(tuple(retired.items()), UDP_DROP_SOCKETS_RETIRED),
        )

    def _fold_sequence(self) -> int:
        return int(_FOLD_SEQUENCE.unpack_from(self.buffer, _FOLD_SEQUENCE_OFFSET)[0])

    def snapshot(self, patience: float = SNAPSHOT_PATIENCE) -> Snapshot:
        """The header and the slots in use, read between folds (for summing totals)."""
        give_up = time.monotonic() + patience
        while True:
            before = self._fold_sequence()
            if before % 2 == 0:
                master, slots = self.master(), self.slots()
                if self._fold_sequence() == before:
                    return Snapshot(master, slots)
            if time.monotonic() >= give_up:  # a master stopped mid-fold: settle for this
                return Snapshot(self.master(), self.slots())
            time.sleep(0.0001)

    # -- slots --------------------------------------------------------------------
    @staticmethod
    def _offset(index: int) -> int:
        return HEADER_SIZE + index * SLOT_SIZE

    def slot(self, index: int) -> SlotView:
        offset = self._offset(index)
        pid, generation, state, worker_id, started, heartbeat, active = _SLOT_HEAD.unpack_from(
            self.buffer, offset
        )
        counters = _COUNTERS.unpack_from(self.buffer, offset + _SLOT_HEAD.size)
        drops = _pairs(_SLOT_DROPS.unpack_from(self.buffer, offset + _SLOT_DROPS_OFFSET))
        return SlotView(
            index,
            pid,
            generation,
            State(state),
            worker_id,
            started,
            heartbeat,
            active,
            counters,
            drops,
        )

    def slots(self) -> list[SlotView]:
        """Every slot in use."""
        views = []
        for index in range(MAX_SLOTS):
            if _PID.unpack_from(self.buffer, self._offset(index))[0]:
                views.append(self.slot(index))
        return views

    def claim(self, index: int, *, pid: int, generation: int, worker_id: int) -> None:
        offset = self._offset(index)
        _store(
            self.buffer,
            _SLOT_HEAD,
            offset,
            pid,
            generation,
            State.BOOTING,
            worker_id,
            time.time(),
            time.monotonic(),
            0,
        )
        _store(self.buffer, _COUNTERS, offset + _SLOT_HEAD.size, *((0,) * NUM_COUNTERS))
        _store(
            self.buffer,
            _SLOT_DROPS,
            offset + _SLOT_DROPS_OFFSET,
            *_flat((), UDP_DROP_SOCKETS_PER_SLOT),
        )
        self._bump_roster()

    def set_pid(self, index: int, pid: int) -> None:
        _store(self.buffer, _PID, self._offset(index), pid)

    def release(self, index: int) -> None:
        self.buffer[self._offset(index) : self._offset(index) + SLOT_SIZE] = bytes(SLOT_SIZE)
        self._bump_roster()

    def _bump_roster(self) -> None:
        (roster,) = _ROSTER.unpack_from(self.buffer, _ROSTER_OFFSET)
        _store(self.buffer, _ROSTER, _ROSTER_OFFSET, (roster + 1) & 0xFFFFFFFF)


class WorkerSlot:
    """A worker's handle on its own slot: cheap writes; of the others, only their load."""

    def __init__(self, board: Scoreboard, index: int) -> None:
        self.path = board.path
        self.buffer = board.buffer
        self.offset = Scoreboard._offset(index)
        self.counters_offset = self.offset + _SLOT_HEAD.size
        self.active_offset = self.offset + _ACTIVE_OFFSET
        self.accept_state_offset = self.offset + _ACCEPT_STATE_OFFSET

    def set_active(self, count: int) -> None:
        """Open connections, written on every accept and close: peers balance on it."""
        _store(self.buffer, _U32, self.active_offset, count)

    def set_accept_state(self, state: int) -> None:
        _store(self.buffer, _U8, self.accept_state_offset, state)

    def roster(self) -> int:
        return int(_ROSTER.unpack_from(self.buffer, _ROSTER_OFFSET)[0])

    def peer_offsets(self) -> list[int]:
        """Where the other claimed slots are (a scan: call when the roster changed)."""
        peers = []
        for index in range(MAX_SLOTS):
            offset = Scoreboard._offset(index)
            if offset != self.offset and self.buffer[offset + _STATE_OFFSET] != State.FREE:
                peers.append(offset)
        return peers

    def peer_load(self, offset: int) -> tuple[int, int, float, int]:
        """(pid, accept state, heartbeat, open connections) of the peer at offset."""
        return _PEER_LOAD.unpack_from(self.buffer, offset)  # type: ignore[return-value]

    def heartbeat(self, now: float) -> None:
        _store(self.buffer, _F64, self.offset + _HEARTBEAT_OFFSET, now)

    def set_state(self, state: State) -> None:
        _store(self.buffer, _U8, self.offset + _STATE_OFFSET, state)

    def drain_timeout(self) -> float:
        """What the master wrote before its TERM (see Scoreboard.set_drain_timeout)."""
        return float(
            _DRAIN_TIMEOUT.unpack_from(self.buffer, self.offset + _DRAIN_TIMEOUT_OFFSET)[0]
        )

    def publish(self, now: float, active: int, counters: list[int]) -> None:
        """Heartbeat, active connections and every counter in one go."""
        _store(self.buffer, _HEARTBEAT_ACTIVE, self.offset + _HEARTBEAT_OFFSET, now, active)
        _store(self.buffer, _COUNTERS, self.counters_offset, *counters)

    def publish_udp_drops(self, pairs: DropPairs) -> None:
        """The latest kernel drop count seen per UDP socket (at most
        UDP_DROP_SOCKETS_PER_SLOT sockets; written only when a count rose)."""
        _store(
            self.buffer,
            _SLOT_DROPS,
            self.offset + _SLOT_DROPS_OFFSET,
            *_flat(pairs, UDP_DROP_SOCKETS_PER_SLOT),
        )


def _master_status(value: int) -> MasterStatus:
    try:
        return MasterStatus(value)
    except ValueError:  # written by a newer master: it is up, whatever it is doing
        return MasterStatus.SERVING


def scoreboard_path(pidfile: str) -> str:
    """One scoreboard per pidfile, beside it, so tools find it from the pidfile alone."""
    base = pidfile[:-4] if pidfile.endswith(".pid") else pidfile
    return base + ".scoreboard"
