"""The committed man pages and completions are what tools/docgen makes from the code."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from docgen import generate
from support.paths import REPO

from echod import cli
from echod.config import KEYS
from echod.ctl import main as ctl_main

DATA = REPO / "echod" / "data"


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return generate.render_all(REPO)


@pytest.mark.parametrize("name", generate.FILES)
def test_committed_file_is_up_to_date(name: str, rendered: dict[str, str]) -> None:
    committed = DATA / name
    assert committed.exists(), f"{committed} is missing: run make generated"
    assert committed.read_text() == rendered[name], f"{name} is stale: run make generated"


def test_regenerating_into_a_directory_writes_the_same_files(tmp_path: Path) -> None:
    generate.write_all(tmp_path, REPO)
    for name in generate.FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"{name} differs: run make generated"
        )


def test_every_echod_flag_is_in_its_man_page() -> None:
    page = (DATA / "man" / "echod.8").read_text()
    actions = [a for a in cli.build_parser()._actions if not isinstance(a, argparse._HelpAction)]
    flags = [flag for action in actions for flag in action.option_strings]
    assert "--bind" in flags
    missing = [flag for flag in flags if flag.replace("-", "\\-") not in page]
    assert not missing, missing


def test_every_config_key_is_in_echod_toml_5() -> None:
    page = (DATA / "man" / "echod.toml.5").read_text()
    missing = [key for key in KEYS if f"\\fB{key}\\fR = " not in page]
    assert not missing, missing
    assert "(undocumented)" not in page, "a key has no comment block in etc/echod.toml"


def test_a_key_gets_its_own_comment_block() -> None:
    docs = {
        doc.name: doc for doc in generate.config_key_docs((REPO / "etc/echod.toml").read_text())
    }
    assert docs["backlog"].default == "1024"
    assert docs["backlog"].description == "listen(2) backlog for TCP and unix listeners."
    # keys listed together share one block
    assert docs["user"].description == docs["group"].description != ""


def test_every_echoctl_command_is_in_its_man_page_and_completion() -> None:
    page = (DATA / "man" / "echoctl.1").read_text()
    completion = (DATA / "completion" / "echoctl.bash").read_text()
    parser = ctl_main.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = list(subparsers.choices)
    assert {"send", "check", "bench", "status", "stop"} <= set(commands)
    for command in commands:
        assert "'echoctl " + command.replace("-", "\\-") + "'" in page, command
        assert command in completion, command
