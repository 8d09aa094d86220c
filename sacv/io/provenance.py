"""Package versions for run.json, and the name of this process for shard markers."""

from __future__ import annotations

import os
import socket
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "sacv",
    "torch",
    "torchvision",
    "numpy",
    "zarr",
    "dask",
    "dask-ml",
    "scikit-learn",
    "pandas",
    "pyarrow",
    "prefect",
)


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def this_process() -> str:
    """``<host>:<pid>``: which process (on a cluster, which worker) wrote a shard."""
    return f"{socket.gethostname()}:{os.getpid()}"
