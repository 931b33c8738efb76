"""Process exit codes (BSD sysexits where one fits) shared by echod and echoctl."""

from typing import Final

OK: Final = 0
FAILURE: Final = 1  # anything else, a bug included (SPEC: never a traceback)
USAGE: Final = 64  # bad command line, including a malformed --bind
UNAVAILABLE: Final = 69  # cannot bind or listen, or already running
NOPERM: Final = 77  # privilege drop failed
CONFIG: Final = 78  # bad or missing config file

# A worker that cannot even start (it failed before serving) exits with this,
# so the master stops respawning instead of entering a crash loop.
WORKER_BOOT_FATAL: Final = 3
