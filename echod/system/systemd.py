"""systemd integration: readiness/status notifications, the watchdog, socket activation.

systemd learns that echod is up, reloading or stopping, and that its master is
alive, only through sd_notify(3) datagrams; socket activation hands it sockets
as fds 3.. described by ``LISTEN_*`` variables. Both are small protocols, so
they are spoken here with the standard library rather than through a binding,
and every call is harmless when echod does not run under systemd.

The master owns all of it: ``NOTIFY_SOCKET`` stays in its environment so a
re-executed master (USR2, same pid) can keep notifying, while
``scrub_child_environ`` keeps workers and pre-flight children from notifying
systemd or claiming its sockets.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass

from echod.addresses import format_host_port
from echod.errors import BindError

log = logging.getLogger("echod.systemd")

SD_LISTEN_FDS_START = 3
# Variables that belong to the process systemd started (the master) and to no child.
SYSTEMD_CHILD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# systemd reads the notification socket promptly; a receiver that does not should
# not stall the master's event loop for long.
_SEND_TIMEOUT_SECONDS = 1.0


def _notify_address(value: str) -> str | None:
    """Turn ``$NOTIFY_SOCKET`` into a ``sendto`` address; None if unsupported."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock: (systemd >= 254), not used by echod's deployments


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None


@dataclass(frozen=True)
class Notifier:
    """Sends sd_notify(3) messages to systemd; a no-op when ``address`` is None."""

    address: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw_address = env.get("NOTIFY_SOCKET", "")
        address = _notify_address(raw_address) if raw_address else None
        if raw_address and address is None:
            log.debug("ignoring unsupported NOTIFY_SOCKET=%r", raw_address)
        watchdog_usec = _positive_int(env.get("WATCHDOG_USEC"))
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_pid is not None and _positive_int(watchdog_pid) != os.getpid():
            watchdog_usec = None  # the watchdog is meant for another process
        return cls(address=address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, lines: Iterable[str]) -> bool:
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(_SEND_TIMEOUT_SECONDS)
                sock.sendto(message, self.address)
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", message, self.address, exc)
            return False
        return True

    def notify(self, **fields: str | int) -> bool:
        return self.send(f"{key}={value}" for key, value in fields.items())

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=_one_line(status))

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) requires the timestamp; older ones ignore it.
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=now_usec)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=_one_line(status))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.splitlines())


@dataclass(frozen=True)
class InheritedSocket:
    """A socket passed by systemd socket activation (still open, at ``fd``)."""

    fd: int
    name: str
    family: socket.AddressFamily
    type: socket.SocketKind
    address: str | bytes | tuple[str, int] | tuple[str, int, int, int]
    listening: bool

    @property
    def bind_spec(self) -> str:
        """The address in echod's ``--bind`` syntax, to match configured binds."""
        if self.family == socket.AF_UNIX:
            path = self.address
            if isinstance(path, bytes):  # abstract socket: leading NUL
                path = "@" + path[1:].decode(errors="replace")
            return f"unix:{path}"
        assert isinstance(self.address, tuple)
        # An AF_INET6 host always contains ":", so it gets its brackets.
        host_port = format_host_port(self.address[0], self.address[1])
        return f"udp://{host_port}" if self.type == socket.SOCK_DGRAM else host_port

    def socket(self) -> socket.socket:
        """A socket object that owns (and will close) ``fd``."""
        return socket.socket(fileno=self.fd)


def _describe(fd: int, name: str) -> InheritedSocket:
    try:
        os.set_inheritable(fd, False)  # as sd_listen_fds() sets FD_CLOEXEC
        probe = socket.socket(fileno=fd)  # detects family and type from the fd
    except OSError as exc:
        raise BindError(
            f"socket activation: fd {fd} ({name}) is not a usable socket: {exc.strerror}"
        ) from exc
    try:
        listening = bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        return InheritedSocket(
            fd=fd,
            name=name,
            family=probe.family,
            type=probe.type,
            address=probe.getsockname(),
            listening=listening,
        )
    finally:
        probe.detach()  # the fd stays open for the caller


def listen_fds(unset_environment: bool = True) -> list[InheritedSocket]:
    """The sockets systemd passed to this process (sd_listen_fds_with_names(3))."""
    env = os.environ
    try:
        if _positive_int(env.get("LISTEN_PID")) != os.getpid():
            return []  # absent, or meant for the process that exec'd us
        count = env.get("LISTEN_FDS", "")
        if not count.isdigit():
            raise BindError(f"socket activation: invalid LISTEN_FDS={count!r}")
        fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
        raw_names = env.get("LISTEN_FDNAMES")
        names = raw_names.split(":") if raw_names is not None else []
        if len(names) != len(fds):
            if raw_names is not None:
                log.warning("LISTEN_FDNAMES does not match LISTEN_FDS=%d; ignoring it", len(fds))
            names = ["unknown"] * len(fds)  # systemd's own default name
        return [_describe(fd, name) for fd, name in zip(fds, names, strict=True)]
    finally:
        if unset_environment:
            for variable in _LISTEN_VARIABLES:
                env.pop(variable, None)


def scrub_child_environ(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Remove systemd's per-process variables from ``env`` (in place) and return it."""
    for variable in SYSTEMD_CHILD_VARIABLES:
        env.pop(variable, None)
    return env
