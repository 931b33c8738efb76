"""Process exit codes (BSD sysexits where one fits) shared by echod and echoctl."""

from typing import Final

OK: Final = 0
FAILURE: Final = 1  # anything else, a bug included (SPEC: never a traceback)
USAGE: Final = 64  # bad command line, including a malformed --bind
UNAVAILABLE: Final = 69  # cannot bind or listen, or already running
NOPERM: Final = 77  # privilege drop failed, or a runtime directory someone else controls
CONFIG: Final = 78  # bad or missing config file

# echoctl send / bench: nothing answered at all, or nothing could connect (as
# ping exits 2); some answers but wrong or missing ones are FAILURE.
NO_ANSWER: Final = 2

# A worker that cannot even start (it failed before serving) exits with this,
# so the master stops respawning instead of entering a crash loop.
WORKER_BOOT_FATAL: Final = 3
