"""Out-of-core concept hyperplanes over dask arrays of positions, blocked along samples only.

Three solvers of the same balanced L2 logistic regression as :class:`sacv.method.vectors.SpatialConceptVector`
(objective ``C Σ s_i log(1 + exp(-y_i z_i)) + ½‖w‖²``, ``s_i`` balanced class weights):

- ``lbfgs``: exact. SciPy L-BFGS drives float32 loss/gradient sums computed block by block with dask
  (one read pass per evaluation, memory bounded by a few blocks). Diagonal preconditioning by the
  channel scale changes the path, not the minimiser.
- ``sgd``: ``SGDClassifier(loss="log_loss", average=True).partial_fit`` over dask blocks, one block in
  memory at a time (the loop dask-ml's ``Incremental`` runs, without its graph that lets the
  scheduler load every block ahead; here at most ``SGD_PAIRS_IN_FLIGHT`` pairs); each epoch pairs a
  concept block with a random block (classes
  balanced by sampling), shuffles positions within the pair, and regularises in standardised space
  (``alpha = 1 / (C n)``). Bounded memory at any size.
- ``inmemory``: scikit-learn on a class-stratified subsample that fits ``memory_budget_mb``.
- ``dask_ml``: ``dask_ml.linear_model.LogisticRegression(solver="lbfgs")`` on the dask array (on the
  Dask cluster when a client is active). It takes no sample weights, so the larger class is
  subsampled to the size of the smaller (unit weights = balanced weights), and it penalises the
  intercept too (small here: positions are centred first). Close to the exact solution, not equal.
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

from sacv.fit.solvers import logistic_terms
from sacv.method.vectors import fit_logistic, grouped_validation_split, set_fitted_vector

SOLVERS = ("inmemory", "lbfgs", "sgd", "dask_ml")
BYTES_PER_VALUE_IN_MEMORY = 24  # float64 copy, standardised copy and solver workspace per value
SGD_PAIRS_IN_FLIGHT = 4  # sgd: block pairs read at once (bounds memory, overlaps reading)


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
    """Weighted logistic loss and gradient of one block in the preconditioned parameters."""
    xs = (x.astype(np.float32) - mean.astype(np.float32)) / scale.astype(np.float32)
    z = xs @ u.astype(np.float32) + np.float32(b)
    sign = 2.0 * y - 1.0
    margin = sign * z.astype(np.float64)
    terms, slope = logistic_terms(margin)  # log(1 + e^-margin), σ(-margin)
    loss = float(weight @ terms)
    g = (-sign * weight * slope).astype(np.float32)  # d loss / d z
    return loss, (xs.T @ g).astype(np.float64), float(g.sum(dtype=np.float64))


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
        epochs: int = 5,
        memory_budget_mb: int = 1024,
        random_state: int = 0,
    ):
        self.solver = solver  # inmemory | lbfgs | sgd | dask_ml
        self.C = C  # inverse L2 strength
        self.standardize = standardize  # penalise in z-scored space (always so for sgd)
        self.validation_fraction = validation_fraction  # share of images per side held out
        self.max_positions_per_class = max_positions_per_class  # optional subsample of training positions
        self.near_chance = near_chance  # warn below this held-out balanced accuracy
        self.max_iter = max_iter  # lbfgs iterations
        self.tol = tol  # lbfgs: relative loss decrease (and scaled projected gradient) to stop at
        self.epochs = epochs  # sgd passes
        self.memory_budget_mb = memory_budget_mb  # inmemory subsample size
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

    def _fit_inmemory(self, X: da.Array, y: np.ndarray) -> tuple[np.ndarray, float]:
        cap = self.memory_budget_mb * 2**20 // (X.shape[1] * BYTES_PER_VALUE_IN_MEMORY * 2)
        rng = np.random.default_rng(self.random_state)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:cap] for c in (0, 1)]))
        self.passes_, self.n_iter_ = 1, 0
        return fit_logistic(
            X[keep].compute().astype(np.float64), y[keep], self.C, self.standardize, 2000, self.random_state
        )

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
            loss = self.C * sum(p[0] for p in parts) + 0.5 * float(u @ (penalty * u))
            grad_u = self.C * sum(p[1] for p in parts) + penalty * u
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

    def _fit_sgd(self, X: da.Array, y: np.ndarray) -> tuple[np.ndarray, float]:
        from sklearn.linear_model import SGDClassifier

        mean, scale = _moments(X)
        positive, negative = X[y == 1], X[y == 0]
        sgd = SGDClassifier(
            loss="log_loss",
            alpha=1.0 / (self.C * len(y)),
            learning_rate="adaptive",
            eta0=0.01,
            average=True,
            random_state=self.random_state,
        )
        rng = np.random.default_rng(self.random_state)
        for _ in range(self.epochs):
            pairs = _paired_epoch(positive, negative, mean, scale, rng)
            for start in range(0, len(pairs), SGD_PAIRS_IN_FLIGHT):  # read a few pairs in parallel, no more
                for x_block, y_block in dask.compute(*pairs[start : start + SGD_PAIRS_IN_FLIGHT]):
                    sgd.partial_fit(x_block, y_block, classes=[0, 1])
        self.passes_, self.n_iter_ = 1 + self.epochs, self.epochs
        w = sgd.coef_[0] / scale
        return w, float(sgd.intercept_[0] - w @ mean)


def _mix(pos: np.ndarray, neg: np.ndarray, mean: np.ndarray, scale: np.ndarray, seed: int):
    x = (np.concatenate([pos, neg]).astype(np.float32) - mean.astype(np.float32)) / scale.astype(np.float32)
    y = np.concatenate([np.ones(len(pos), np.int8), np.zeros(len(neg), np.int8)])
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order], y[order]


def _paired_epoch(positive: da.Array, negative: da.Array, mean, scale, rng: np.random.Generator) -> list:
    """One epoch of standardised, shuffled blocks (lazy), each a concept block paired with a random block."""
    pos_blocks, neg_blocks = positive.to_delayed().ravel(), negative.to_delayed().ravel()
    n_blocks = max(len(pos_blocks), len(neg_blocks))
    pos_order = np.resize(rng.permutation(len(pos_blocks)), n_blocks)  # the smaller side cycles
    neg_order = np.resize(rng.permutation(len(neg_blocks)), n_blocks)
    return [
        dask.delayed(_mix)(pos_blocks[p], neg_blocks[q], mean, scale, int(rng.integers(2**31)))
        for p, q in zip(pos_order, neg_order)
    ]
