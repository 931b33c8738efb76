"""Expected errors: each carries the exit code the CLI turns it into."""

from __future__ import annotations

from echod import exitcodes


class EchodError(Exception):
    """An error the user caused or can fix; printed as one line, never a traceback."""

    exit_code: int = exitcodes.FAILURE


class UsageError(EchodError):
    exit_code = exitcodes.USAGE


class ConfigError(EchodError):
    exit_code = exitcodes.CONFIG


class BindError(EchodError):
    exit_code = exitcodes.UNAVAILABLE


class AlreadyRunning(EchodError):
    exit_code = exitcodes.UNAVAILABLE


class PrivilegeError(EchodError):
    exit_code = exitcodes.NOPERM


class UnsafeRuntimeDir(EchodError):
    """The runtime directory is a symlink, someone else's, or writable by others."""

    exit_code = exitcodes.NOPERM
