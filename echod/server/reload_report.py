"""What a reload changed, said in the log: the keys with their values (but never a
secret-like one's), and a warning for each key only a restart applies.

The master reads these keys once, at start: who it runs as (user, group),
where its files are (runtime_dir, pidfile: the pidfile lock, the scoreboard and
echoctl's way in are there) and the umask of a daemon. A reload keeps their
running values, so the configuration in force stays the one that is true.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, replace
from typing import Any

from echod.config import Config

log = logging.getLogger("echod.master")

RESTART_ONLY = ("user", "group", "runtime_dir", "pidfile", "umask")
SECRET_LIKE = re.compile(r"pass|secret|token|credential|private|auth", re.IGNORECASE)

Changes = dict[str, tuple[Any, Any]]


def changes(old: Config, new: Config) -> Changes:
    """Every key whose value differs: name -> (old, new), in the Config's order."""
    before, after = asdict(old), asdict(new)
    return {key: (before[key], after[key]) for key in before if before[key] != after[key]}


def shown(key: str, value: Any) -> str:
    if SECRET_LIKE.search(key):
        return "(redacted)"
    if key == "umask":
        return oct(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return repr(value)


def keep_start_only(old: Config, new: Config) -> Config:
    """The new config, with the keys only a restart applies at their running values."""
    return replace(new, **{key: getattr(old, key) for key in RESTART_ONLY})


def report(old: Config, new: Config) -> Config:
    """Log what `new` changes against `old`; return the config that takes effect."""
    changed = changes(old, new)
    if not changed:
        log.info("reload: no configuration key changed")
        return new
    log.info(
        "reload: changed %s",
        ", ".join(f"{key} {shown(key, a)} -> {shown(key, b)}" for key, (a, b) in changed.items()),
    )
    later = [key for key in RESTART_ONLY if key in changed]
    if later:
        log.warning(
            "reload: %s changed, but only a restart applies %s; running with the old %s",
            ", ".join(later),
            "it" if len(later) == 1 else "them",
            "value" if len(later) == 1 else "values",
        )
    return keep_start_only(old, new)
