#!/usr/bin/python3
"""The container's HEALTHCHECK: GET /healthz on echod's metrics listener.

Installed in the image as /usr/local/bin/echod-healthcheck. It asks the address
echod itself uses: ECHOD_METRICS_BIND when set (tests run the container on free
ports), else the config file's ``metrics_bind`` ($ECHOD_CONFIG). A wildcard
address is asked on loopback. Exit 0 when /healthz answers 200, else 1 with
one line saying why (podman shows it in ``podman healthcheck run`` / inspect).
Standard library only, so that it costs one short python3 start.
"""

from __future__ import annotations

import http.client
import os
import sys
import tomllib

DEFAULT_CONFIG = "/etc/echod/echod.toml"
TIMEOUT_SECONDS = 3.0
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}


def metrics_bind() -> str:
    """The metrics address, as echod resolves it: environment, then config file."""
    if "ECHOD_METRICS_BIND" in os.environ:
        return os.environ["ECHOD_METRICS_BIND"]
    path = os.environ.get("ECHOD_CONFIG", DEFAULT_CONFIG)
    with open(path, "rb") as file:
        value = tomllib.load(file).get("metrics_bind", "")
    return value if isinstance(value, str) else ""


def split(address: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT to a (host to ask, port) pair."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return WILDCARDS.get(host, host), int(port)


def main() -> int:
    try:
        address = metrics_bind()
        if not address:
            print("unhealthy: metrics_bind is off, so echod has no /healthz")
            return 1
        host, port = split(address)
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = response.read(200).decode("utf-8", "replace").strip()
    except (OSError, ValueError, tomllib.TOMLDecodeError, http.client.HTTPException) as exc:
        print(f"unhealthy: /healthz: {exc}")
        return 1
    print(f"{response.status} {body}")
    return 0 if response.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
