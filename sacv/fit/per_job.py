"""Out-of-core concept hyperplanes over dask arrays of positions, blocked along samples only.

Two solvers of the objective in ``sacv.method.logistic`` (the balanced L2 logistic regression of
:class:`sacv.method.vectors.SpatialConceptVector`), one job at a time:

- ``lbfgs``: exact. SciPy L-BFGS drives float32 loss/gradient sums computed block by block with dask
  (one read pass per evaluation, memory bounded by a few blocks). Diagonal preconditioning by the
  channel scale changes the path, not the minimiser.
- ``dask_ml``: ``dask_ml.linear_model.LogisticRegression(solver="lbfgs")`` on the dask array (on the
  Dask cluster when a client is active). It takes no sample weights, so the larger class is
  subsampled to the size of the smaller (unit weights = balanced weights), and it penalises the
  intercept too (small here: positions are centred first). Close to the exact solution, not equal.

The fit stage's default is the batched exact solver (``sacv.fit.solvers``), faster than either for
one job and cheaper per vector with more.
"""

from __future__ import annotations

import time
import warnings

import dask
import dask.array as da
import numpy as np
import zarr
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin

from sacv.method.logistic import l2_penalty, weighted_logistic
from sacv.method.vectors import grouped_validation_split, set_fitted_vector

SOLVERS = ("lbfgs", "dask_ml")


def positions_from_store(array: zarr.Array, rows: np.ndarray) -> da.Array:
    """Positions of store rows ``rows`` (sorted, unique) of an (N, H, W, C) array as (n*H*W, C).

    Row ``r*H*W + i*W + j`` of the result is ``array[rows[r], i, j, :]``; blocks follow the store's
    chunks along N (one block per chunk touched), so a pass reads each chunk once.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0 or np.any(np.diff(rows) <= 0):
        raise ValueError("rows must be a non-empty, sorted list of distinct store rows")
    images = da.from_zarr(array)[rows]  # (n, H, W, C)
    n, h, w, c = images.shape
    return images.reshape(n * h * w, c)  # channels last: every row is one position's C-vector


def _moments(X: da.Array) -> tuple[np.ndarray, np.ndarray]:
    x64 = X.astype(np.float64)
    mean, sq = dask.compute(x64.mean(axis=0), (x64**2).mean(axis=0))
    scale = np.sqrt(np.maximum(sq - mean**2, 0.0))
    scale[scale < 1e-12] = 1.0
    return mean, scale


def _loss_grad_block(x, y, weight, u, b, mean, scale):
    """The objective's data term (``sacv.method.logistic``) over one block, with its gradient in the
    preconditioned parameters: x (m, C), y (m,) in {0, 1}, weight (m,) balanced weights."""
    xs = (x.astype(np.float32) - mean.astype(np.float32)) / scale.astype(np.float32)
    z = xs @ u.astype(np.float32) + np.float32(b)  # (m,) float32
    sign = 2.0 * y - 1.0
    loss, dz = weighted_logistic(z.astype(np.float64)[:, None, None], sign[:, None], weight[:, None])
    g = dz.reshape(-1).astype(np.float32)  # (m,) d loss / d z
    return float(loss[0]), (xs.T @ g).astype(np.float64), float(g.sum(dtype=np.float64))


def _split(values: np.ndarray, chunks: tuple[int, ...]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(chunks)[:-1])


class OutOfCoreConceptVector(ClassifierMixin, BaseEstimator):
    """SACV fitter over a dask array of positions (scikit-learn contract, like SpatialConceptVector).

    ``fit(X, y, groups)``: X dask (n, C); y (n,) in {0, 1} (1 = concept); groups (n,) image ids.
    Learned attributes as SpatialConceptVector, plus ``solver_``, ``passes_`` (read passes over the
    training positions) and ``n_iter_``.
    """

    def __init__(
        self,
        solver: str = "lbfgs",
        C: float = 1.0,
        standardize: bool = False,
        validation_fraction: float = 0.25,
        max_positions_per_class: int | None = None,
        near_chance: float = 0.6,
        max_iter: int = 200,
        tol: float = 1e-8,
        random_state: int = 0,
    ):
        self.solver = solver  # lbfgs | dask_ml
        self.C = C  # inverse L2 strength
        self.standardize = standardize  # penalise in z-scored space
        self.validation_fraction = validation_fraction  # share of images per side held out
        self.max_positions_per_class = max_positions_per_class  # optional subsample of training positions
        self.near_chance = near_chance  # warn below this held-out balanced accuracy
        self.max_iter = max_iter  # lbfgs iterations
        self.tol = tol  # lbfgs: relative loss decrease (and scaled projected gradient) to stop at
        self.random_state = random_state  # split, subsample, shuffles

    def fit(self, X: da.Array, y, groups):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not isinstance(X, da.Array) or X.ndim != 2 or len(X.chunks[1]) != 1:
            raise ValueError(
                "X must be a 2-D dask array blocked along samples only; rechunk it with X.rechunk({1: -1})"
            )
        y, groups = np.asarray(y).astype(np.int8), np.asarray(groups)
        if len(y) != X.shape[0] or len(groups) != X.shape[0]:
            raise ValueError(f"y and groups need {X.shape[0]} entries, got {len(y)} and {len(groups)}")
        is_val = grouped_validation_split(y, groups, self.validation_fraction, self.random_state)
        train = ~is_val
        if self.max_positions_per_class:
            rng = np.random.default_rng(self.random_state)
            for c in (0, 1):
                rows = np.flatnonzero(train & (y == c))
                train[rng.permutation(rows)[self.max_positions_per_class :]] = False
        X_train, y_train = X[train], y[train]
        started = time.perf_counter()
        w, b = getattr(self, f"_fit_{self.solver}")(X_train, y_train)
        self.fit_seconds_ = time.perf_counter() - started
        self.solver_ = self.solver
        val_scores = (X[is_val].astype(np.float64) @ w + b).compute()
        set_fitted_vector(self, w, b, y[is_val], val_scores, int((y_train == 1).sum()), int((y_train == 0).sum()))
        return self

    def _fit_lbfgs(self, X: da.Array, y: np.ndarray) -> tuple[np.ndarray, float]:
        mean, scale = _moments(X)
        weight = np.where(y == 1, len(y) / (2 * (y == 1).sum()), len(y) / (2 * (y == 0).sum()))
        blocks = list(zip(X.to_delayed().ravel(), _split(y, X.chunks[0]), _split(weight, X.chunks[0])))
        penalty = np.ones_like(scale) if self.standardize else 1.0 / scale**2  # ½‖w‖² with w = u / scale
        passes = [1]

        def objective(params):
            u, b = params[:-1], params[-1]
            parts = dask.compute(
                *[dask.delayed(_loss_grad_block)(x, yb, wb, u, b, mean, scale) for x, yb, wb in blocks]
            )
            passes[0] += 1
            penalty_value, penalty_grad = l2_penalty(u, penalty)
            loss = self.C * sum(p[0] for p in parts) + float(penalty_value)
            grad_u = self.C * sum(p[1] for p in parts) + penalty_grad
            grad_b = self.C * sum(p[2] for p in parts)
            return loss, np.append(grad_u, grad_b)

        result = minimize(
            objective,
            np.zeros(X.shape[1] + 1),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "ftol": self.tol, "gtol": self.tol * self.C},
        )
        self.passes_, self.n_iter_ = passes[0], int(result.nit)
        w = result.x[:-1] / scale
        return w, float(result.x[-1] - w @ mean)

    def _fit_dask_ml(self, X: da.Array, y: np.ndarray) -> tuple[np.ndarray, float]:
        from dask.callbacks import Callback
        from dask_ml.linear_model import LogisticRegression

        mean, scale = _moments(X)
        rng = np.random.default_rng(self.random_state)
        n = min(int((y == 0).sum()), int((y == 1).sum()))
        keep = np.zeros(len(y), bool)
        keep[np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c in (0, 1)])] = True
        divisor = scale if self.standardize else np.ones_like(scale)  # the penalty's space, as in lbfgs
        Xs = (X[keep].astype(np.float64) - mean) / divisor
        computes = [0]

        class Count(Callback):  # one compute = one read pass (local schedulers; a cluster reports 0)
            def _start(self, dsk):
                computes[0] += 1

        clf = LogisticRegression(C=self.C, solver="lbfgs", max_iter=self.max_iter, tol=self.tol)
        with Count(), warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            clf.fit(Xs, y[keep])
        self.passes_, self.n_iter_ = 1 + computes[0], 0
        w = np.asarray(clf.coef_, np.float64) / divisor
        return w, float(clf.intercept_ - w @ mean)
