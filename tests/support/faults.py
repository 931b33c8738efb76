"""Faults injected into a real echod from the tests' side, so that production code
carries no test hooks.

Python imports a ``sitecustomize`` module found on ``sys.path`` at start-up,
before ``-m echod`` runs. :func:`boot_fault_env` writes one into a directory
and returns the environment that puts that directory on the echod
subprocess's ``PYTHONPATH`` (children it forks or re-executes inherit it):
there it replaces the worker's boot step with one that raises, which is what a
worker that cannot start does. The worker's own handling (log the reason, exit
``WORKER_BOOT_FATAL``) and the master's (stop instead of looping) stay real.
"""

from __future__ import annotations

import os
from pathlib import Path

BOOT_FAILURE = "boot failure injected by tests/support/faults.py"

_SITECUSTOMIZE = f'''\
"""Written by tests/support/faults.py: every echod worker fails to boot."""
from echod.server import worker


def _failing_boot(self):
    raise RuntimeError({BOOT_FAILURE!r})


worker.Worker._boot = _failing_boot
'''


def boot_fault_env(directory: Path) -> dict[str, str]:
    """Environment for an echod whose every worker fails in ``Worker._boot``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    inherited = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([str(directory), *([inherited] if inherited else [])])}
