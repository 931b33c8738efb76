"""Load during an in-place upgrade, run INSIDE the sandbox by inside.sh (Debian's python3).

Keeps one TCP conversation open (a numbered line every 20 ms, each echo checked)
and opens a new connection every few ms (a short payload, echo checked, close)
until the file named by argv[1] appears; then prints one JSON line: connections
attempted, refused, failed otherwise, and whether the held conversation kept
echoing throughout. Bounded: gives up after MAX_SECONDS whatever happens.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

ADDRESS = ("127.0.0.1", 7)
NEW_CONNECTION_EVERY = 0.005
HELD_EVERY = 0.02
MAX_SECONDS = 300.0


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = conn.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    return got


def hold(stop: threading.Event, result: dict[str, object]) -> None:
    """One conversation across the whole upgrade: every line must come back."""
    try:
        with socket.create_connection(ADDRESS, timeout=10) as conn:
            number = 0
            while not stop.is_set():
                line = f"held {number}\n".encode()
                conn.sendall(line)
                if recv_exactly(conn, len(line)) != line:
                    result["held_error"] = f"line {number} not echoed"
                    return
                number += 1
                result["held_lines"] = number
                time.sleep(HELD_EVERY)
    except OSError as exc:
        result["held_error"] = f"{type(exc).__name__}: {exc}"


def connect_once(counts: dict[str, int], number: int) -> None:
    payload = f"new {number}\n".encode()
    counts["attempted"] += 1
    try:
        with socket.create_connection(ADDRESS, timeout=10) as conn:
            conn.sendall(payload)
            if recv_exactly(conn, len(payload)) != payload:
                counts["wrong_echo"] += 1
    except ConnectionRefusedError:
        counts["refused"] += 1
    except OSError:
        counts["other_errors"] += 1


def main() -> int:
    stop_file = sys.argv[1]
    ready_file = sys.argv[2]
    stop = threading.Event()
    held: dict[str, object] = {"held_lines": 0, "held_error": None}
    holder = threading.Thread(target=hold, args=(stop, held), daemon=True)
    holder.start()
    counts = {"attempted": 0, "refused": 0, "other_errors": 0, "wrong_echo": 0}
    started = time.monotonic()
    number = 0
    while not os.path.exists(stop_file) and time.monotonic() - started < MAX_SECONDS:
        connect_once(counts, number)
        number += 1
        if number == 50:
            open(ready_file, "w").close()  # load is flowing: start the upgrade
        time.sleep(NEW_CONNECTION_EVERY)
    held_before = held["held_lines"]
    time.sleep(10 * HELD_EVERY)  # the held conversation still echoes after the upgrade
    stop.set()
    holder.join(timeout=15)
    kept = held["held_error"] is None and int(held["held_lines"]) > int(held_before)
    print(
        json.dumps(
            {
                **counts,
                "seconds": round(time.monotonic() - started, 1),
                "held_lines": held["held_lines"],
                "held_kept": kept,
                "held_error": held["held_error"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
