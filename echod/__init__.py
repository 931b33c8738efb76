"""echod: a pre-fork TCP/UDP echo server daemon (RFC 862)."""

from __future__ import annotations

from importlib import metadata


def installed_version() -> str:
    """The installed distribution's version, read afresh (an upgrade may change it)."""
    try:
        return metadata.version("echod")
    except metadata.PackageNotFoundError:
        return "0+unknown"
