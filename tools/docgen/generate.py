"""The generators; `write_all` writes every file, `render_all` returns them."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage

from echod import cli
from echod.config import Config
from echod.ctl import main as ctl_main

# A fixed date, not today's: regenerating must give byte-identical files.
# Bump it when the pages change in substance.
DATE = "2026-12-05"
PROJECT = "echod"

MAN_FILES = ("man/echod.8", "man/echoctl.1", "man/echod.toml.5")
COMPLETION_FILES = (
    "completion/echod.bash",
    "completion/echoctl.bash",
    "completion/_echod",
    "completion/_echoctl",
)
FILES = MAN_FILES + COMPLETION_FILES


def _manpage(parser: argparse.ArgumentParser, section: int, title: str) -> str:
    page = Manpage(
        parser,
        _data={
            "date": DATE,
            "project_name": PROJECT,
            "manual_section": section,
            "manual_title": title,
            "description": parser.description,
        },
    )
    if parser.usage:
        # a hand-written short usage ("... (echod --help for all)") suits the
        # terminal; the man page's SYNOPSIS lists every option as argparse would
        formatter = parser._get_formatter()
        formatter.add_usage(None, parser._actions, parser._mutually_exclusive_groups, "")
        page.synopsis = formatter.format_help().split()
    # argparse-manpage writes the SYNOPSIS words raw: a bare "-" is a typographic
    # hyphen in roff, so "--pidfile" would not copy-paste; \- is the ASCII minus
    page.synopsis = page.synopsis[:1] + [word.replace("-", "\\-") for word in page.synopsis[1:]]
    if parser.epilog and parser.formatter_class is argparse.RawDescriptionHelpFormatter:
        # a hand-laid-out epilog (examples in columns): keep its lines, do not fill
        text = page.format_text(parser.epilog)
        page.parser._manpage.append({"heading": "comments", "content": f".nf\n{text}\n.fi"})
    return str(page)


@dataclass(frozen=True)
class KeyDoc:
    name: str
    default: str
    description: str


_KEY_LINE = re.compile(r"^#?\s*([a-z_]+)\s*=")


def config_key_docs(example: str) -> list[KeyDoc]:
    """One KeyDoc per Config field: its default and the comment block above it in
    etc/echod.toml (keys listed together share their block)."""
    comments: dict[str, str] = {}
    block: list[str] = []
    after_key = False  # a comment after a key line starts the next key's block
    names = {f.name for f in fields(Config)}
    for line in example.splitlines():
        match = _KEY_LINE.match(line)
        if match and match.group(1) in names:
            comments[match.group(1)] = " ".join(block)
            after_key = True
            continue
        if not line.startswith("#") or after_key or line.lstrip("# ").startswith("---"):
            block = []  # a blank line, a new block or a section rule
        after_key = False
        if line.startswith("#") and not line.lstrip("# ").startswith("---"):
            block.append(line.lstrip("#").strip())
    docs = []
    for f in fields(Config):
        if f.default is not MISSING:
            default = _toml(f.name, f.default)
        else:  # a default_factory: depends on the host, the comment says how
            default = "depends on the host (see below)"
        docs.append(KeyDoc(f.name, default, comments.get(f.name, "")))
    return docs


def _toml(name: str, value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(name, item) for item in value) + "]"
    if isinstance(value, str):
        return '"' + value + '"'
    if name == "umask" and isinstance(value, int):
        return oct(value)
    return repr(value)


def _roff(text: str) -> str:
    """Escape text for a roff body line: backslashes, and a leading . or '."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text[:1] in (".", "'"):
        text = "\\&" + text
    return text


def config_manpage(example: str) -> str:
    lines = [
        f'.TH ECHOD.TOML 5 "{DATE}" "{PROJECT}" "File Formats"',
        ".SH NAME",
        "echod.toml \\- configuration file of echod(8)",
        ".SH SYNOPSIS",
        "/etc/echod/echod.toml",
        ".SH DESCRIPTION",
        _roff(
            "A TOML file of top-level keys; every key is optional. Precedence: built-in "
            "defaults < this file < ECHOD_<KEY> environment variables < command-line flags. "
            "Check a change before reloading with echod --check-config --config PATH; "
            "echod --print-config prints the effective configuration."
        ),
        ".SH KEYS",
    ]
    for doc in config_key_docs(example):
        lines += [".TP", f"\\fB{doc.name}\\fR = {_roff(doc.default)}"]
        lines.append(_roff(doc.description) if doc.description else "(undocumented)")
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBECHOD_CONFIG\\fR",
        "path of the configuration file when \\-\\-config is not given",
        ".TP",
        "\\fBECHOD_\\fIKEY\\fR",
        _roff("overrides the key KEY (upper case) of the file"),
        ".SH SEE ALSO",
        ".BR echod (8),",
        ".BR echoctl (1)",
        "",
    ]
    return "\n".join(lines)


@contextmanager
def _fixed_width() -> Iterator[None]:
    """argparse wraps help at the terminal's width (COLUMNS): fix it so the output
    never depends on where `make generated` ran; restore it for the caller."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def render_all(root: Path) -> dict[str, str]:
    """Every generated file's relative path and text."""
    echod_parser = cli.build_parser()
    ctl_parser = ctl_main.build_parser()
    example = (root / "etc" / "echod.toml").read_text()
    with _fixed_width():
        return {
            "man/echod.8": _manpage(echod_parser, 8, "System Administration"),
            "man/echoctl.1": _manpage(ctl_parser, 1, "User Commands"),
            "man/echod.toml.5": config_manpage(example),
            "completion/echod.bash": shtab.complete(echod_parser, shell="bash"),
            "completion/echoctl.bash": shtab.complete(ctl_parser, shell="bash"),
            "completion/_echod": shtab.complete(echod_parser, shell="zsh"),
            "completion/_echoctl": shtab.complete(ctl_parser, shell="zsh"),
        }


def write_all(out: Path, root: Path) -> list[Path]:
    written = []
    for name, text in render_all(root).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
