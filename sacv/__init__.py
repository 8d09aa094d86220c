"""Spatial Activation Concept Vectors at dataset scale.

``sacv.run(config)`` runs the pipeline as ``sacv run`` does and returns the run;
``sacv.open_run(uri)`` opens a finished run for notebooks (``sacv.api``), ``sacv.plot`` draws its
figures. They load on first use, so ``import sacv`` stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {"run": "sacv.cli", "open_run": "sacv.api", "Run": "sacv.api", "plot": None}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sacv' has no attribute {name!r}")
    if _LAZY[name] is None:
        return importlib.import_module(f"sacv.{name}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["Run", "open_run", "plot", "run"]
