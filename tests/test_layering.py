"""The library's layers: each subpackage of ``sacv`` imports only from the layers below it (and from
itself), so no arrow runs back up and no cycle can form between packages; and the library core stays
free of the orchestration: no module of ``sacv`` but the CLI imports ``prefect``, ``prefect_dask``,
``flows`` or ``tasks`` (statically, and none of them pulls Prefect in when imported)."""

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
MODULES = sorted(PACKAGE.rglob("*.py"))
CORE = [p for p in MODULES if p.relative_to(PACKAGE).as_posix() not in EDGE]

# Rank of each unit (a subpackage, or a module at the top): a unit may import units of lower rank,
# and itself. Units of one rank are independent of each other. docs/architecture.md draws this.
LAYERS = {
    "errors": -1,
    "method": 0,
    "stats": 0,
    "io": 1,
    "plot": 1,
    "config": 2,
    "audit": 3,
    "demo": 3,
    "extract": 4,
    "fit": 5,
    "score": 6,
    "api": 7,
    "report": 8,
    "cli": 9,
}


def unit_of(module: str) -> str:
    """'sacv.fit.sweep' -> 'fit'; 'sacv.config' -> 'config'; 'sacv' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from sacv.io import storage` imports the module sacv.io.storage
            names |= {
                f"{node.module}.{alias.name}"
                if node.module.count(".") == 1 and node.module.startswith("sacv.")
                else node.module
                for alias in node.names
            }
    return names


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "module.py"
    module.write_text(
        "import os\n\ndef later():\n    from prefect import flow\n    import tasks.fit\n"
        "    from sacv.io import storage, runlock\n"
    )
    assert imported_modules(module) == {"os", "prefect", "tasks.fit", "sacv.io.storage", "sacv.io.runlock"}
    assert "flows.pipeline" in imported_modules(PACKAGE / "cli.py")  # the edge does call the flows


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in MODULES} - {""}
    assert units == set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS, drop {sorted(set(LAYERS) - units)}"


def test_a_layer_violation_is_caught(tmp_path):
    """The check itself: a module of `io` importing the fit stage would be reported."""
    assert (
        not allowed("io", "sacv.fit.sweep") and allowed("fit", "sacv.io.storage") and allowed("fit", "sacv.fit.lbfgs")
    )
    assert not allowed("method", "sacv.stats.contributions")  # one rank, two units: independent


def allowed(unit: str, imported: str) -> bool:
    target = unit_of(imported)
    return target in ("", unit) or LAYERS[target] < LAYERS[unit]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_module_imports_only_lower_layers(path):
    unit = unit_of(module_name(path))
    if not unit:
        return  # sacv/__init__.py loads api and plot lazily, by name
    upward = sorted(m for m in imported_modules(path) if m.split(".")[0] == "sacv" and not allowed(unit, m))
    assert not upward, (
        f"sacv/{path.relative_to(PACKAGE)} ({unit}, layer {LAYERS[unit]}) imports {upward} from "
        "a layer at or above its own; move the shared code down (tests/test_layering.py LAYERS)"
    )


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_module_imports_no_orchestration(path):
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"sacv/{path.relative_to(PACKAGE)} imports {bad}; move that code to flows/ or tasks/"


def test_importing_every_core_module_loads_no_prefect():
    modules = [module_name(p) for p in CORE]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows', 'tasks'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    )
    assert result.stdout.strip() == "", f"importing sacv loaded {result.stdout.strip()}"
