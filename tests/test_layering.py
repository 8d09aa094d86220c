"""The library core stays free of the orchestration: no module of ``sacv`` but the CLI imports
``prefect``, ``prefect_dask``, ``flows`` or ``tasks`` (statically, and none of them pulls Prefect in
when imported)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sacv

PACKAGE = Path(sacv.__file__).parent
EDGE = {"cli.py"}  # the command line may call the flows
FORBIDDEN = ("prefect", "prefect_dask", "flows", "tasks")
CORE = sorted(p for p in PACKAGE.glob("*.py") if p.name not in EDGE)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("import os\n\ndef later():\n    from prefect import flow\n    import tasks.fit\n")
    assert imported_modules(module) == {"os", "prefect", "tasks.fit"}
    assert "flows.pipeline" in imported_modules(PACKAGE / "cli.py")  # the edge does call the flows


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_module_imports_no_orchestration(path):
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"sacv/{path.name} imports {bad}; move that code to flows/ or tasks/"


def test_importing_every_core_module_loads_no_prefect():
    modules = [f"sacv.{p.stem}" for p in CORE if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows', 'tasks'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    assert result.stdout.strip() == "", f"importing sacv loaded {result.stdout.strip()}"
