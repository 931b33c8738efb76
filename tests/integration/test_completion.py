"""The generated completions work in the real shells: bash completes a word through
the completion function, zsh loads the completion functions."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from support.paths import REPO

COMPLETION = REPO / "echod" / "data" / "completion"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # fail, not skip: a silent skip would hide a broken completion
        pytest.fail(f"{name} is not installed (apt-get install {name})")
    return path


def _bash_complete(command: str, word: str) -> list[str]:
    """What bash offers for `command word<TAB>`, through the registered function."""
    script = f"""
source {COMPLETION / (command + ".bash")}
function=$(complete -p {command} | sed -E 's/.* -F ([^ ]+) .*/\\1/')
COMP_WORDS=({command} {word}); COMP_CWORD=1
COMP_LINE="{command} {word}"; COMP_POINT=${{#COMP_LINE}}
"$function" {command} {word} {command}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run(
        [_tool("bash"), "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout.split()


def test_bash_completes_echoctl_subcommands() -> None:
    offered = _bash_complete("echoctl", "st")
    assert "status" in offered
    assert "stop" in offered
    assert all(word.startswith("st") for word in offered), offered


def test_bash_completes_echod_flags() -> None:
    offered = _bash_complete("echod", "--log-f")
    assert sorted(offered) == ["--log-file", "--log-format"]


@pytest.mark.parametrize("name", ["_echod", "_echoctl"])
def test_zsh_parses_and_autoloads_the_completion(name: str) -> None:
    zsh = _tool("zsh")
    path = COMPLETION / name
    syntax = subprocess.run([zsh, "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, syntax.stderr
    # +X loads the function's definition from fpath without running it
    script = f"fpath=({COMPLETION} $fpath); autoload -Uz +X {name} && whence -w {name}"
    loaded = subprocess.run([zsh, "-f", "-c", script], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert f"{name}: function" in loaded.stdout
    assert path.read_text().startswith(f"#compdef {name[1:]}")
