"""Out-of-core concept hyperplanes: planted truth, memory bound, random sets, Dask, cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from sacv.fit.per_job import OutOfCoreConceptVector, positions_from_store
from sacv.method.vectors import fit_logistic, grouped_validation_split

REPO = Path(__file__).resolve().parents[1]


def planted_store(path: Path, n_images: int, hw: int = 6, channels: int = 12, shift: float = 2.0, seed: int = 0):
    """(N, hw, hw, C) float16 store; odd images are concept images moved by `shift` along unit `u`."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=channels)
    u /= np.linalg.norm(u)
    labels = np.arange(n_images) % 2
    array = zarr.create_array(
        str(path), shape=(n_images, hw, hw, channels), chunks=(16, hw, hw, channels), dtype="float16"
    )
    for start in range(0, n_images, 16):
        block = rng.normal(size=(min(16, n_images - start), hw, hw, channels))
        block += shift * labels[start : start + 16, None, None, None] * u
        array[start : start + 16] = block
    return array, u, labels


def positions(array, labels):
    rows = np.arange(array.shape[0])
    X = positions_from_store(array, rows)
    per_image = X.shape[0] // len(rows)
    return X, np.repeat(labels, per_image), np.repeat(rows, per_image)


def test_positions_follow_the_store_layout(tmp_path):
    array, _, labels = planted_store(tmp_path / "s.zarr", 40)
    X, _, groups = positions(array, labels)
    assert X.chunks[1] == (12,) and set(X.chunks[0]) <= {16 * 36, 8 * 36}
    dense = X.compute()
    stored = array[...]
    for r, i, j in [(0, 0, 0), (17, 3, 5), (39, 5, 2)]:
        np.testing.assert_array_equal(dense[r * 36 + i * 6 + j], stored[r, i, j])
        assert groups[r * 36 + i * 6 + j] == r


@pytest.mark.parametrize("solver", ["lbfgs", "dask_ml"])
def test_every_solver_recovers_the_planted_direction_and_agrees_with_sklearn(tmp_path, solver):
    array, u, labels = planted_store(tmp_path / "s.zarr", 160)
    X, y, groups = positions(array, labels)
    fitted = OutOfCoreConceptVector(solver=solver, C=0.05, random_state=3).fit(X, y, groups)
    assert fitted.vector_ @ u >= 0.99
    assert fitted.metrics_["bal_acc"] > 0.8 and not fitted.near_chance_
    # the exact in-memory solution on the same training positions
    is_val = grouped_validation_split(y, groups, 0.25, seed=3)
    dense = X.compute().astype(np.float64)
    w, b = fit_logistic(dense[~is_val], y[~is_val], C=0.05, standardize=False, max_iter=5000, seed=3)
    cosine = fitted.coef_ @ w / (np.linalg.norm(fitted.coef_) * np.linalg.norm(w))
    assert cosine >= (0.9999 if solver == "lbfgs" else 0.999)  # dask_ml: a class-balancing subsample
    if solver == "lbfgs":
        np.testing.assert_allclose(fitted.coef_, w, rtol=2e-3, atol=2e-4)
        assert fitted.intercept_ == pytest.approx(b, rel=2e-3, abs=2e-4)


def test_refuses_arrays_blocked_along_channels(tmp_path):
    array, _, labels = planted_store(tmp_path / "s.zarr", 20)
    X, y, groups = positions(array, labels)
    with pytest.raises(ValueError, match="rechunk"):
        OutOfCoreConceptVector().fit(X.rechunk({1: 4}), y, groups)


MEMORY_SCRIPT = """
import re, sys, warnings, zarr, numpy as np
warnings.simplefilter("ignore")
from sacv.fit.per_job import OutOfCoreConceptVector, positions_from_store
array = zarr.open_array(sys.argv[1], mode="r")
rows = np.arange(array.shape[0])
X = positions_from_store(array, rows)
per = X.shape[0] // len(rows)
y, groups = np.repeat(rows % 2, per), np.repeat(rows, per)
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS: imports done
before = status("VmRSS")
if sys.argv[2] == "load-everything":  # the control: what a fit that loads the store would cost
    X.astype(np.float32).compute()
else:
    OutOfCoreConceptVector(solver=sys.argv[2], max_iter=15, random_state=0).fit(X, y, groups)
print(status("VmHWM") - before)  # kB this process grew by at its peak
"""
GROWTH_LIMIT_MB = 48  # a fit may hold a few blocks; the whole store as float32 positions is 79 MB


def peak_growth_mb(path: Path, mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), mode], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1]) / 1024


@pytest.fixture(scope="module")
def large_store(tmp_path_factory) -> Path:
    """4800 images x 8 x 8 positions x 64 channels: 39 MB float16 on disk, 79 MB as float32 positions."""
    path = tmp_path_factory.mktemp("memory") / "large.zarr"
    planted_store(path, 4800, hw=8, channels=64)
    return path


def test_loading_the_store_breaks_the_memory_limit(large_store):
    """The control: the limit below is tight enough to catch a fit that loads the whole store."""
    assert peak_growth_mb(large_store, "load-everything") > 1.5 * GROWTH_LIMIT_MB


def test_peak_memory_of_a_fit_stays_below_an_absolute_limit(large_store):
    assert peak_growth_mb(large_store, "lbfgs") < GROWTH_LIMIT_MB
