"""No import cycles: a module never imports one that (transitively) imports it back.

A cycle makes import order matter, hides which module owns a concept, and
drags one side's dependencies into everything that imports the other (the
metrics process would load the worker's hot path). lint-imports checks the
package boundaries; this checks every module pair, which its contracts cannot
express in general.
"""

from __future__ import annotations

import subprocess
import sys

import grimp
import pytest


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # cache_dir=None: never leave a cache directory in the tree
    return grimp.build_graph("echod", cache_dir=None)


def test_no_module_imports_one_that_imports_it_back(graph: grimp.ImportGraph) -> None:
    cycles: list[str] = []
    seen: set[frozenset[str]] = set()
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is None:
                continue
            members = frozenset(back)
            if members in seen:  # the same cycle, entered from another of its edges
                continue
            seen.add(members)
            cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_graph_sees_the_whole_package(graph: grimp.ImportGraph) -> None:
    # Guard against a vacuous pass: a mistyped package name would give no edges.
    assert {"echod.cli", "echod.server.master", "echod.ctl.main"} <= graph.modules
    assert graph.direct_import_exists(importer="echod.ctl.main", imported="echod.ctl.send")


def test_the_access_log_does_not_import_the_worker(graph: grimp.ImportGraph) -> None:
    # It hangs off the worker as a close hook; the worker's hot path stays its own.
    assert not graph.chain_exists(importer="echod.server.access", imported="echod.server.worker")


def test_the_metrics_process_loads_nothing_of_the_server() -> None:
    # What is really imported at run time, lazy imports and all.
    code = "import sys, echod.metrics.render, echod.metrics.service; print(*sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [name for name in loaded if name.startswith("echod.server")] == []


def test_the_master_and_the_worker_code_load_no_psutil() -> None:
    # max_worker_memory is sampled by each worker, which imports psutil when it
    # starts with a limit; the master's own code never needs it.
    code = "import sys, echod.server.master, echod.server.worker; print('psutil' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "False"
