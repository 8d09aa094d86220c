"""Executes docs/example.ipynb on a run directory and stores the outputs in the notebook.

Regenerate, offline, from the repository root:

    make install && .venv/bin/sacv demo --out demo-out  # the library with the demo and the kernel; demo-out/run
    .venv/bin/python scripts/example_notebook.py      # reads demo-out/run, rewrites docs/example.ipynb

The notebook runs in a Jupyter kernel (nbclient, ipykernel) started in the repository root, with
``SACV_RUN`` set to the run and ``SACV_CONFIG`` unset (it opens the run, runs no pipeline), its
figures drawn at ``DPI``. The notebook's metadata records a hash of its code cells:
tests/test_api.py executes the notebook the same way on a small run and checks that the stored
outputs come from the stored code.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "example.ipynb"
DPI = 72  # the figures' resolution in the stored notebook (keeps it under 1 MB)


def code_hash(nb: nbformat.NotebookNode) -> str:
    """sha256 of the notebook's code cells, in order."""
    code = "\0".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    return hashlib.sha256(code.encode()).hexdigest()


def execute(nb: nbformat.NotebookNode, run: str, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute ``nb`` (in place) on the run directory or URL ``run``; an error in a cell raises."""
    env = {k: v for k, v in os.environ.items() if k != "SACV_CONFIG"} | {"SACV_RUN": run}
    client = NotebookClient(
        nb,
        timeout=timeout,
        record_timing=False,
        resources={"metadata": {"path": str(ROOT)}},
        extra_arguments=[f'--InlineBackend.print_figure_kwargs={{"dpi": {DPI}, "bbox_inches": "tight"}}'],
    )
    client.execute(env=env)
    nb.metadata["sacv"] = {"code_sha256": code_hash(nb)}
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="demo-out/run", help="run directory or URL (default: demo-out/run)")
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK)
    args = parser.parse_args()
    nb = execute(nbformat.read(args.notebook, as_version=4), args.run)
    nbformat.write(nb, args.notebook)
    print(f"{args.notebook}: {args.notebook.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
