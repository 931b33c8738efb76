# ruff: noqa
"""Names vulture reports as unused although Python itself uses them.

Only false positives belong here; dead code is deleted, not listed. Read by
`vulture` (paths in pyproject's [tool.vulture]); never imported.
"""

_.format  # logging.Formatter.format overrides (echod/logs.py): logging calls them
exc_type  # __exit__(exc_type, exc, traceback) must take all three (echod/pidfile.py)
traceback
frame  # a signal handler is called as handler(signum, frame) (echod/server/signals.py)
