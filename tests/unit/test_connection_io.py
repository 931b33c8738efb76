"""Connection sockets are left in blocking mode (setblocking(False) would cost an
ioctl per connection), so every recv and send on one must pass MSG_DONTWAIT: one
call without it could block the whole worker on a single slow client. This finds
each such call in the modules that handle TCP connections and checks its flags."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import echod.server
from echod.server.connection import DONTWAIT

SERVER = Path(echod.server.__file__).parent
# udp.py is not here: its sockets are listeners, made non-blocking when bound
CONNECTION_MODULES = ("accepting.py", "connection.py", "proxied.py", "worker.py")
IO_FUNCTIONS = {"recv_into", "send", "socket_recv_into", "socket_send"}
IO_METHODS = {"recv", "recv_into", "recvfrom", "recvmsg", "send", "sendall", "sendmsg", "sendto"}


def io_calls(tree: ast.AST) -> list[ast.Call]:
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Name) and func.id in IO_FUNCTIONS) or (
            isinstance(func, ast.Attribute) and func.attr in IO_METHODS
        ):
            calls.append(node)
    return calls


def test_dontwait_is_msg_dontwait() -> None:
    assert DONTWAIT == socket.MSG_DONTWAIT


def test_every_recv_and_send_on_a_connection_passes_dontwait() -> None:
    missing, found = [], 0
    for name in CONNECTION_MODULES:
        tree = ast.parse((SERVER / name).read_text(), name)
        for call in io_calls(tree):
            found += 1
            if not any(isinstance(a, ast.Name) and a.id == "DONTWAIT" for a in call.args):
                missing.append(f"{name}:{call.lineno}: {ast.unparse(call)}")
    assert found >= 7  # the echo path, backpressure, PROXY headers, the gentle close
    assert not missing, "\n".join(missing)


def test_no_connection_module_makes_sockets_non_blocking() -> None:
    # the flags make it unnecessary; a stray setblocking(False) is the ioctl back
    for name in CONNECTION_MODULES:
        assert "setblocking" not in (SERVER / name).read_text(), name
