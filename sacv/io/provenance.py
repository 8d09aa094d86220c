"""Package versions for run.json."""

from __future__ import annotations

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
