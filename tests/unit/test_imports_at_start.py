"""What the server imports, and when.

- python-daemon is imported only where echod daemonizes, never in the foreground
  path (systemd, containers): before 3.0.1 its import costs memory in proportion
  to the descriptor limit.
- Once the master serves, no code of the server imports a module that is not
  loaded yet: a package upgrade replaces echod's files under the running master,
  and a lazy import would mix them into the old process
  (tests/integration/test_files_replaced.py checks the same thing black-box).
"""

from __future__ import annotations

import ast
import subprocess
import sys

from support.paths import REPO

PACKAGE = REPO / "echod"
# Function-level imports that are fine, with the reason:
ALLOWED = {
    # echod.cli.main picks what to load before anything serves
    ("echod/cli.py", "echod.server.startup"): "before serving",
    # daemon mode, at start-up, before the master serves: python-daemon only there
    ("echod/system/daemonize.py", "daemon"): "before serving",
    # the worker's memory sampler: psutil is loaded by the master already (below)
    ("echod/server/worker_memory.py", "psutil"): "already loaded",
}
SERVER_ENTRY = "import echod.server.startup"


def function_level_imports() -> set[tuple[str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                else:
                    continue
                found.update((str(path.relative_to(REPO)), name) for name in names)
    return found


def modules_after(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_no_lazy_import_but_the_allowed_ones() -> None:
    assert function_level_imports() <= set(ALLOWED), sorted(function_level_imports())


def test_the_server_does_not_import_python_daemon_until_it_daemonizes() -> None:
    loaded = modules_after(SERVER_ENTRY)
    assert "daemon" not in loaded
    assert "echod.system.daemonize" in loaded  # the module is there, its import is not


def test_what_the_worker_imports_lazily_the_master_has_loaded() -> None:
    loaded = modules_after(SERVER_ENTRY)
    already = [name for (_, name), why in ALLOWED.items() if why == "already loaded"]
    assert set(already) <= loaded
