"""Listening sockets: opened once by the master, before any fork, and shared by
every worker. A reload diffs them (unchanged addresses keep their socket); an
in-place upgrade hands them to the new program image by file descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from echod.addresses import Address, Transport, format_host_port, parse_address
from echod.errors import BindError
from echod.system.systemd import listen_fds

SOCK_DGRAM = int(socket.SOCK_DGRAM)


@dataclass(eq=False)
class Listener:
    address: Address  # as configured; the identity used when diffing on reload
    sock: socket.socket
    unix_inode: tuple[int, int] | None = field(default=None)
    activated: bool = False  # handed over by systemd: kept whatever the config says
    # family, type and proto as plain ints, read once: the socket's own attributes
    # build an enum on every read, and a worker needs them on every accept
    shape: tuple[int, int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.shape = (int(self.sock.family), int(self.sock.type), self.sock.proto)

    @property
    def is_datagram(self) -> bool:
        return self.shape[1] == SOCK_DGRAM

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def bound(self) -> str:
        """The address actually bound (the chosen port when configured with port 0)."""
        return describe_socket(self.sock)

    def close(self, unlink: bool = True) -> None:
        """Close our copy; remove a unix socket file only if it is still ours."""
        if unlink and self.unix_inode is not None:
            path = self.address.path
            with contextlib.suppress(OSError):
                info = os.stat(path)
                if (info.st_dev, info.st_ino) == self.unix_inode:
                    os.unlink(path)
        self.sock.close()


def size_receive_buffers(listeners: Iterable[Listener], size: int) -> int | None:
    """Ask for SO_RCVBUF = size on every UDP listener (0: leave the kernel's default).

    Linux caps the request at net.core.rmem_max (and stores double the value,
    for its bookkeeping); SO_RCVBUFFORCE, which would bypass the cap as root, is
    deliberately not used: the sysctl is the host's policy. Returns the size the
    kernel granted when it is less than asked (for one log line), else None.
    """
    capped = None
    for listener in listeners:
        if not listener.is_datagram or not size:
            continue
        with contextlib.suppress(OSError):
            listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            granted = listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
            if granted < size:
                capped = granted
    return capped


def describe_socket(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    prefix = "udp://" if sock.type == socket.SOCK_DGRAM else ""
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return prefix + format_host_port(name[0], name[1])


def open_listener(address: Address, backlog: int) -> Listener:
    """Bind one configured address; raise BindError saying what and where."""
    try:
        match address.transport:
            case Transport.UNIX:
                return _open_unix(address, backlog)
            case Transport.FD:
                return Listener(address, _adopt_fd(address))
            case _:
                return Listener(address, _open_inet(address, backlog))
    except BindError:
        raise
    except OSError as exc:
        raise BindError(f"cannot listen on {address}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    return exc.strerror or str(exc)


def _open_inet(address: Address, backlog: int) -> socket.socket:
    kind = socket.SOCK_DGRAM if address.transport is Transport.UDP else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=kind, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise BindError(
            f"cannot listen on {address}: cannot resolve {address.host!r}: {exc.strerror}"
        ) from None
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        if family == socket.AF_INET6:
            # [::] means IPv6 only; bind 0.0.0.0 too if you want both, as nginx does
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _open_unix(address: Address, backlog: int) -> Listener:
    path = address.path
    _remove_stale_unix_socket(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
        info = os.stat(path)
    except BaseException:
        sock.close()
        raise
    return Listener(address, sock, unix_inode=(info.st_dev, info.st_ino))


def _remove_stale_unix_socket(address: Address) -> None:
    """Remove a socket file nobody listens on; never touch a live one or a non-socket."""
    path = address.path
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise BindError(f"cannot listen on {address}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: left by a process that died
        return
    except OSError:
        return  # let bind() report the real problem
    finally:
        probe.close()
    raise BindError(f"cannot listen on {address}: another process is listening there")


def _adopt_fd(address: Address) -> socket.socket:
    try:
        sock = socket.socket(fileno=address.fd)
    except OSError as exc:
        raise BindError(f"cannot use {address}: {exc.strerror}") from None
    if sock.type == socket.SOCK_STREAM and not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise BindError(f"cannot use {address}: the socket is not listening")
    sock.setblocking(False)
    return sock


def open_listeners(
    addresses: Iterable[Address],
    backlog: int,
    inherited: Mapping[Address, socket.socket] | None = None,
) -> list[Listener]:
    """Open every address (or take an inherited socket for it); all or nothing."""
    opened: list[Listener] = []
    try:
        for address in addresses:
            if inherited and address in inherited:
                sock = inherited[address]
                sock.setblocking(False)
                opened.append(Listener(address, sock, _unix_inode(address)))
            else:
                opened.append(open_listener(address, backlog))
    except BaseException:
        for listener in opened:
            listener.close()
        raise
    return opened


def _unix_inode(address: Address) -> tuple[int, int] | None:
    if address.transport is not Transport.UNIX:
        return None
    try:
        info = os.stat(address.path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


@dataclass
class ListenerChange:
    kept: list[Listener]
    opened: list[Listener]
    removed: list[Listener]

    @property
    def listeners(self) -> list[Listener]:
        return self.kept + self.opened


def reconcile(current: list[Listener], wanted: Iterable[Address], backlog: int) -> ListenerChange:
    """Diff listeners for a reload: keep unchanged sockets (never close-and-rebind)."""
    by_address = {listener.address: listener for listener in current}
    wanted = list(dict.fromkeys(wanted))
    kept = [by_address[a] for a in wanted if a in by_address]
    opened = open_listeners([a for a in wanted if a not in by_address], backlog)
    for listener in kept:
        if not listener.is_datagram and listener.sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):
                listener.sock.listen(backlog)  # a changed backlog applies in place
    wanted_set = set(wanted)
    removed = [
        listener
        for listener in current
        if listener.address not in wanted_set and not listener.activated
    ]
    kept += [
        listener
        for listener in current
        if listener.activated and listener.address not in wanted_set
    ]
    return ListenerChange(kept, opened, removed)


def take_activated_sockets(
    addresses: Iterable[Address],
) -> tuple[dict[Address, socket.socket], list[Listener]]:
    """Sockets from systemd socket activation: those matching a configured bind, and
    the rest (served as well: the socket unit is the administrator's word too).

    A configured address matches an inherited socket bound to the same address, or,
    for the same transport and port, either side's wildcard: the shipped socket unit
    listens on [::]:7 while the config names 127.0.0.1:7.
    """
    inherited = listen_fds()
    if not inherited:
        return {}, []
    by_spec = {entry.bind_spec: entry for entry in inherited}
    matched: dict[Address, socket.socket] = {}
    for address in addresses:
        entry = by_spec.get(str(address)) or _wildcard_match(address, inherited)
        if entry is not None and entry.bind_spec in by_spec:
            del by_spec[entry.bind_spec]
            matched[address] = entry.socket()
    extra = []
    for spec, entry in by_spec.items():
        extra.append(Listener(parse_address(spec), entry.socket(), activated=True))
    return matched, extra


def _wildcard_match(address: Address, inherited: list[Any]) -> Any:
    if address.transport not in (Transport.TCP, Transport.UDP):
        return None
    wildcards = {"0.0.0.0", "::", ""}
    for entry in inherited:
        try:
            candidate = parse_address(entry.bind_spec)
        except ValueError:
            continue
        if (
            candidate.transport is address.transport
            and candidate.port == address.port
            and (candidate.host in wildcards or address.host in wildcards)
        ):
            return entry
    return None


def adopt_sockets(fds_by_address: Mapping[str, int]) -> dict[Address, socket.socket]:
    """Re-wrap sockets handed over by file descriptor (an in-place upgrade)."""
    adopted: dict[Address, socket.socket] = {}
    for address_text, fd in fds_by_address.items():
        try:
            address = parse_address(address_text)
            sock = socket.socket(fileno=fd)
        except (ValueError, OSError) as exc:
            raise BindError(f"cannot take over listener {address_text} (fd {fd}): {exc}") from None
        os.set_inheritable(fd, False)
        adopted[address] = sock
    return adopted
