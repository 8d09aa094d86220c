"""Solvers for many concept vectors at once, from shared reads of the positions.

Positions arrive as blocks ``(x, image)`` from a callable ``blocks()`` (a new iterator per pass):
``x`` (m, C) float32 positions, ``image`` (m,) int64 index of each row's image into the per-image
tables. Jobs (vectors) are described per image and job, so J jobs share every read:

- ``weight`` (n_img, J) float64: the class-balanced weight ``s`` of each training position of the
  image in job j (``n_train / (2 n_class)`` in positions), 0 where the image is not in j's training set;
- ``sign`` (n_img, J): +1 where the image is a concept image of job j, -1 otherwise.

``batched_logistic`` minimises, for every job j at once (stacked parameters (J, C+1), one matrix
product per block and pass for all J), the objective of :class:`sacv.outofcore.OutOfCoreConceptVector`
and :func:`sacv.vectors.fit_logistic`: ``C Σ_i s_ij log(1 + exp(-y_ij z_ij)) + ½‖w_j‖²`` (penalty on
the z-scored normal with ``standardize``), intercept unpenalised. The problems are separable, so the
stacked minimiser is each job's minimiser. ``mean_difference`` is the closed form of FastCAV:
the concept mean minus the random mean of the training positions, optionally whitened.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from sklearn.linear_model import LogisticRegression
from threadpoolctl import ThreadpoolController

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def image_stats(blocks: Blocks, n_images: int, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image sufficient statistics in one pass: sums (n_img, C), sums of squares (n_img, C),
    both float64, and position counts (n_img,) int64."""
    sums, squares = np.zeros((n_images, channels)), np.zeros((n_images, channels))
    counts = np.zeros(n_images, np.int64)
    for x, image in blocks():
        x64 = x.astype(np.float64)
        starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])  # rows of one image are contiguous
        np.add.at(sums, image[starts], np.add.reduceat(x64, starts, axis=0))
        np.add.at(squares, image[starts], np.add.reduceat(x64 * x64, starts, axis=0))
        np.add.at(counts, image[starts], np.diff(np.r_[starts, len(image)]))
    return sums, squares, counts


def job_moments(mask: np.ndarray, sums: np.ndarray, squares: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) over the positions of the images in ``mask`` (n_img, J) bool:
    (J, C) float64 each (a zero deviation becomes 1, as in the per-job solvers)."""
    m = mask.astype(np.float64)
    n = m.T @ counts  # (J,)
    mean = (m.T @ sums) / n[:, None]
    scale = np.sqrt(np.maximum((m.T @ squares) / n[:, None] - mean**2, 0.0))
    scale[scale < 1e-12] = 1.0
    return mean, scale


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS limited to one thread in this thread, and in threads started inside, until the exit.
    (The OpenBLAS here keeps the setting per thread: a limit set in another thread does not apply,
    and threads inherit the setting of the thread that starts them.)"""
    with ThreadpoolController().limit(limits=1, user_api="blas"):  # a new controller sees every BLAS loaded by now
        yield


def fit_threads() -> int:
    """Threads of one batched solve: the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ordered(pool: ThreadPoolExecutor, fn, items: Iterable, depth: int, *args) -> Iterator:
    """``fn(item, *args)`` for each item on ``pool``, yielded in item order, at most ``depth`` in
    flight (a streamed block holds a chunk: the bound keeps memory as the serial loop's)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item, *args))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def batched_logistic(
    blocks: Blocks, weight: np.ndarray, sign: np.ndarray, mean: np.ndarray, scale: np.ndarray,
    C: float, standardize: bool, max_iter: int, tol: float, counts: np.ndarray | None = None, threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Exact balanced L2 logistic regression for J jobs at once (see the module docstring).

    ``mean``, ``scale`` (J, C): each job's training moments (preconditioning; with ``standardize`` also
    the space of the penalty). ``counts`` (n_img,): positions per image, when known (saves the pass
    that otherwise counts them). Each job's objective is divided by ``C Σ_i s_ij`` (same minimiser; the
    scale scikit-learn uses), so that jobs weigh alike in the stacked problem and ``tol`` bounds every
    job's largest gradient component. Returns raw-space normals (J, C) float64, intercepts (J,)
    float64, the L-BFGS iterations and the passes over the blocks (one per evaluation).

    Threads: BLAS runs single-threaded for the whole solve, and each evaluation spreads its blocks
    over ``threads`` Python threads (numpy releases the GIL), summing their partial sums in block
    order, so the result does not depend on ``threads``. Threaded BLAS on these thin products
    (J columns) and on L-BFGS-B's own small vector operations spent more on thread hand-offs than it
    computed (on the 2-core machine under load, L-BFGS-B alone on 1 130 parameters: 3.9–5.3 ms per
    iteration with 2 BLAS threads, 0.3 ms with one).
    """
    threads = threads or fit_threads()
    J, channels = mean.shape
    centre = mean.mean(axis=0)  # shared centre: blocks are centred once in float32 for every job
    offset = mean - centre  # (J, C): each job's mean in centred space
    penalty = np.ones_like(scale) if standardize else 1.0 / scale**2  # ½‖w‖² with w = u / scale
    if counts is not None:
        total = weight.T @ counts
    else:
        total = np.zeros(J)
        for _, image in blocks():
            total += weight[image].sum(axis=0)
    norm = C * total  # (J,) C Σ_i s_ij
    passes = [int(counts is None)]

    def partial(block: tuple[np.ndarray, np.ndarray], w: np.ndarray, b: np.ndarray):
        x, image = block
        xc = x.astype(np.float64) - centre  # (m, C); float64: float32 sums stall the line search near the optimum
        z = xc @ w.T + b  # (m, J): one product for all jobs
        s, y = weight[image], sign[image]
        margin = y * z
        g = -y * s * expit(-margin)  # (m, J) d loss / d z
        return (s * -log_expit(margin)).sum(axis=0), xc.T @ g, g.sum(axis=0)  # loss: log(1 + e^-margin), stable

    def objective(params: np.ndarray, pool: ThreadPoolExecutor) -> tuple[float, np.ndarray]:
        P = params.reshape(J, channels + 1)
        u, c = P[:, :-1], P[:, -1]
        w = u / scale  # (J, C) normals in raw space
        b = c - (w * offset).sum(axis=1)  # (J,) intercepts in centred space
        loss, grad_w, grad_b = np.zeros(J), np.zeros((channels, J)), np.zeros(J)
        for part_loss, part_w, part_b in _ordered(pool, partial, blocks(), 2 * threads, w, b):  # block order
            loss += part_loss
            grad_w += part_w
            grad_b += part_b
        passes[0] += 1
        grad_u = (C * grad_w.T - C * grad_b[:, None] * offset) / scale + penalty * u  # (J, C)
        value = (C * loss + 0.5 * (penalty * u * u).sum(axis=1)) / norm
        grad = np.concatenate([grad_u, C * grad_b[:, None]], axis=1) / norm[:, None]
        return float(value.sum()), grad.ravel()

    with single_threaded_blas(), ThreadPoolExecutor(threads, thread_name_prefix="sacv-fit") as pool:  # workers start inside
        result = minimize(objective, np.zeros(J * (channels + 1)), args=(pool,), jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "ftol": 64 * np.finfo(float).eps, "gtol": tol, "maxcor": 20})
    P = result.x.reshape(J, channels + 1)
    w = P[:, :-1] / scale
    return w, P[:, -1] - (w * mean).sum(axis=1), int(result.nit), passes[0]


def mean_difference(
    pos_mask: np.ndarray, neg_mask: np.ndarray, sums: np.ndarray, counts: np.ndarray, precision: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """FastCAV's direction from per-image sums: concept minus random mean of the training positions,
    times ``precision`` (C, C, an inverse shared covariance) when whitening. ``pos_mask``/``neg_mask``
    (n_img, J) bool: each job's training images per side. Returns the normals (J, C) and the
    midpoint intercepts (J,): ``w·x + b = 0`` halfway between the two means."""
    p, n = pos_mask.astype(np.float64), neg_mask.astype(np.float64)
    mu_pos = (p.T @ sums) / (p.T @ counts)[:, None]  # (J, C)
    mu_neg = (n.T @ sums) / (n.T @ counts)[:, None]
    w = mu_pos - mu_neg
    if precision is not None:
        w = w @ precision  # precision is symmetric
    return w, -(w * (mu_pos + mu_neg)).sum(axis=1) / 2


def shared_precision(blocks: Blocks, channels: int, ridge: float = 1e-3) -> np.ndarray:
    """Inverse of the covariance (C, C) of every position the blocks yield (one pass), shrunk towards
    ``ridge × mean variance`` on the diagonal so that it exists for rank-deficient layers."""
    n, total, outer = 0, np.zeros(channels), np.zeros((channels, channels))
    for x, _ in blocks():
        x64 = x.astype(np.float64)
        n += len(x64)
        total += x64.sum(axis=0)
        outer += x64.T @ x64
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    cov[np.diag_indices(channels)] += ridge * max(float(np.trace(cov)) / channels, 1e-12)
    return np.linalg.inv(cov)


def logistic_1d(projection: np.ndarray, label: np.ndarray, C: float) -> tuple[float, float]:
    """Balanced logistic fit of labels (1 = concept) on a 1-D projection: returns (slope, intercept)."""
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
    clf.fit(projection[:, None], label)
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


def select_scores(blocks: Blocks, w: np.ndarray, b: np.ndarray, want: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decision values ``x·w_j + b_j`` of the positions of the images in ``want`` (n_img, J) bool, for
    every job in one pass: a list of J pairs (scores (n_j,) float64, image (n_j,) int64)."""
    parts: list[list] = [[] for _ in range(len(b))]
    w32 = w.T.astype(np.float32)
    for x, image in blocks():
        z = (x @ w32).astype(np.float64) + b  # (m, J)
        keep = want[image]  # (m, J)
        for j in range(len(b)):
            if keep[:, j].any():
                parts[j].append((z[keep[:, j], j], image[keep[:, j]]))
    return [(np.concatenate([s for s, _ in p]), np.concatenate([i for _, i in p])) if p else
            (np.zeros(0), np.zeros(0, np.int64)) for p in parts]
