"""Solvers for many concept vectors at once, from shared reads of the positions.

Positions arrive as blocks ``(x, image)`` from a callable ``blocks(wanted=None)`` (a new iterator
per pass): ``x`` (m, C) float32 positions, ``image`` (m,) int64 index of each row's image into the
per-image tables (rows of one image contiguous); ``wanted`` (n_img,) bool, when given, lets the
producer skip blocks without a wanted image (they may still hold others). Jobs (vectors) are
described per image and job, so J jobs share every read:

- ``weight`` (n_img, J) float64: the class-balanced weight ``s`` of each training position of the
  image in job j (``n_train / (2 n_class)`` in positions), 0 where the image is not in j's training set;
- ``sign`` (n_img, J): +1 where the image is a concept image of job j, -1 otherwise.

``batched_logistic`` minimises, for every job j (each with its own L-BFGS, ``sacv.fit.lbfgs``; each
block of positions computes only the jobs that train on its images), the objective of
``sacv.method.logistic`` (the one written for every solver): ``C Σ_i s_ij log(1 + exp(-y_ij z_ij)) +
½‖w_j‖²`` (penalty on the z-scored normal with ``standardize``), intercept unpenalised.
``mean_difference`` is the closed form of FastCAV: the concept mean minus the random mean of the
training positions, optionally whitened.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import ThreadpoolController

from sacv.fit.lbfgs import minimize_batched
from sacv.method.logistic import l2_penalty, weighted_logistic

Blocks = Callable[..., Iterable[tuple[np.ndarray, np.ndarray]]]
# Floor of the preconditioner's eigenvalues, × their mean. Chosen by benchmarks/fit_profile.py (Lite0,
# 5 concepts × 10 sets of 10 + nulls, 4 layers) over unwhitened, 1e-3, 1e-2 and 0.1: fewest
# L-BFGS seconds at 0.1 (the 7×7 layers' concept jobs need fewer iterations with the higher floor).
PRECONDITIONER_FLOOR = 0.1


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


def job_moments(
    mask: np.ndarray, sums: np.ndarray, squares: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
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


def _runs(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images of a block and their row counts: rows of one image are contiguous."""
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])
    return image[starts], np.diff(np.r_[starts, len(image)])


@dataclass(frozen=True)
class LogisticJobs:
    """The tables of J jobs of :func:`batched_logistic` (see the module docstring): ``weight`` and
    ``sign`` (n_img, J); each job's training moments ``mean`` and ``scale`` (J, C) (``mean`` centres
    its intercept; with ``standardize``, ``scale`` is the space of the penalty); ``counts`` (n_img,)
    positions per image when known (saves the pass that otherwise counts them)."""

    weight: np.ndarray
    sign: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    counts: np.ndarray | None = None


class _BlockObjective:
    """The objective of every job, summed block by block on ``pool``: ``__call__(params, jobs)`` returns
    the value (k,) and gradient (k, C + 1) of jobs ``jobs`` at ``params`` (k, C + 1) = the solver's
    variables ``u`` (whitened normal) and the intercept in the jobs' own centred space, each divided
    by ``C Σ_i s_ij`` (same minimiser; the scale scikit-learn uses)."""

    def __init__(
        self,
        blocks: Blocks,
        jobs: LogisticJobs,
        C: float,
        standardize: bool,
        norm: np.ndarray,
        whitening: np.ndarray,
        pool: ThreadPoolExecutor,
        threads: int,
    ):
        self.blocks, self.jobs, self.C, self.norm, self.whitening = blocks, jobs, C, norm, whitening
        self.pool, self.threads = pool, threads
        self.centre = jobs.mean.mean(axis=0)  # shared centre: blocks are centred once for every job
        self.offset = jobs.mean - self.centre  # (J, C): each job's mean in centred space
        self.penalty = jobs.scale**2 if standardize else np.ones_like(jobs.scale)  # z-scored or raw normal
        self.trains = jobs.weight > 0  # (n_img, J)

    def block_terms(self, block: tuple[np.ndarray, np.ndarray], w: np.ndarray, b: np.ndarray, wanted: np.ndarray):
        """One block's share of the evaluated jobs ``wanted`` that train on its images: their columns,
        data loss (k,), ``Σ x_c g`` (C, k) and ``Σ g`` (k,), with ``g = d loss / d z``."""
        x, image = block
        ids, lengths = _runs(image)
        cols = np.flatnonzero(self.trains[ids][:, wanted].any(axis=0))  # of the evaluated jobs, those trained here
        if not len(cols):
            return cols, None, None, None
        xc = x.astype(np.float64) - self.centre  # (m, C); float64: float32 sums stall the line search near the optimum
        jobs = wanted[cols]
        z = xc @ w[cols].T + b[cols]  # (m, k): one product for the block's jobs
        s, y = self.jobs.weight[np.ix_(ids, jobs)], self.jobs.sign[np.ix_(ids, jobs)]  # (n, k) per image
        if (lengths != lengths[0]).any():  # images of unequal sizes: per row
            s, y = np.repeat(s, lengths, axis=0), np.repeat(y, lengths, axis=0)
        loss, dz = weighted_logistic(z.reshape(len(s), -1, len(cols)), y, s)  # (k,), (n, positions, k)
        g = dz.reshape(-1, len(cols))  # (m, k) d loss / d z
        return cols, loss, xc.T @ g, g.sum(axis=0)

    def __call__(self, params: np.ndarray, jobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        C, threads = self.C, self.threads
        u, c = params[:, :-1], params[:, -1]  # (k, C), (k,)
        w = u @ self.whitening  # (k, C) raw-space normals
        b = c - (w * self.offset[jobs]).sum(axis=1)  # intercepts in centred space
        k, channels = len(jobs), w.shape[1]
        loss, grad_w, grad_b = np.zeros(k), np.zeros((channels, k)), np.zeros(k)
        passes = self.blocks(self.trains[:, jobs].any(axis=1))  # the blocks holding a training image of these jobs
        for cols, part_loss, part_w, part_b in _ordered(self.pool, self.block_terms, passes, 2 * threads, w, b, jobs):
            if len(cols):  # summed in block order
                loss[cols] += part_loss
                grad_w[:, cols] += part_w
                grad_b[cols] += part_b
        penalty_value, penalty_grad = l2_penalty(w, self.penalty[jobs])
        grad_w = C * grad_w.T - C * grad_b[:, None] * self.offset[jobs] + penalty_grad  # (k, C) d f / d w
        grad_u = grad_w @ self.whitening  # the map is symmetric
        value = (C * loss + penalty_value) / self.norm[jobs]
        return value, np.concatenate([grad_u, C * grad_b[:, None]], axis=1) / self.norm[jobs, None]


def _weight_sums(blocks: Blocks, jobs: LogisticJobs) -> np.ndarray:
    """``Σ_i s_ij`` over every training position, per job (J,): from ``jobs.counts``, else one pass."""
    if jobs.counts is not None:
        return jobs.weight.T @ jobs.counts
    total = np.zeros(jobs.weight.shape[1])
    for _, image in blocks():
        total += jobs.weight[image].sum(axis=0)
    return total


def batched_logistic(
    blocks: Blocks,
    jobs: LogisticJobs,
    C: float,
    standardize: bool,
    max_iter: int,
    tol: float,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact balanced L2 logistic regression for the J jobs of ``jobs`` at once (see the module
    docstring).

    Every job runs its own L-BFGS (``sacv.fit.lbfgs``): a job stops when its gradient is below
    ``tol``, each pass computes only the jobs still running, and in each block only the jobs with a
    training image in it (order the blocks so that images of the same jobs are together).
    Preconditioning: the solver's variables are ``u = w Σ^{1/2}``, with ``Σ`` the covariance of all
    the blocks' positions, eigenvalues floored at ``PRECONDITIONER_FLOOR`` × their mean
    (:func:`whitening_map`, one pass): a change of variables, so the minimiser is the same; ``tol``
    applies to the gradient in ``u``. Returns raw-space normals (J, C) float64, intercepts (J,)
    float64, and per job its L-BFGS iterations (J,) and the passes over its images (J,) (one per
    evaluation, one for ``Σ``, and one counting positions without ``jobs.counts``).

    Threads: BLAS runs single-threaded for the whole solve, and each evaluation spreads its blocks
    over ``threads`` Python threads (numpy releases the GIL), summing their partial sums in block
    order, so the result does not depend on ``threads``. Threaded BLAS on these thin products
    (few columns per block) and on the solver's small vector operations spent more on thread
    hand-offs than it computed (on the 2-core machine under load, L-BFGS-B alone on 1 130
    parameters: 3.9–5.3 ms per iteration with 2 BLAS threads, 0.3 ms with one).
    """
    threads = threads or fit_threads()
    J, channels = jobs.mean.shape
    norm = C * _weight_sums(blocks, jobs)  # (J,) C Σ_i s_ij
    with (
        single_threaded_blas(),
        ThreadPoolExecutor(threads, thread_name_prefix="sacv-fit") as pool,
    ):  # workers start inside
        whitening = whitening_map(blocks, channels, PRECONDITIONER_FLOOR)  # (C, C) Σ^{-1/2}
        objective = _BlockObjective(blocks, jobs, C, standardize, norm, whitening, pool, threads)
        result = minimize_batched(objective, np.zeros((J, channels + 1)), max_iter, tol)
    w = result.x[:, :-1] @ whitening
    passes = result.n_eval + 1 + int(jobs.counts is None)
    return w, result.x[:, -1] - (w * jobs.mean).sum(axis=1), result.n_iter, passes


def mean_difference(
    pos_mask: np.ndarray,
    neg_mask: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    precision: np.ndarray | None = None,
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


def _covariance(blocks: Blocks, channels: int) -> np.ndarray:
    """Covariance (C, C) float64 (ddof 0) of every position the blocks yield, in one pass."""
    n, total, outer = 0, np.zeros(channels), np.zeros((channels, channels))
    for x, _ in blocks():
        x64 = x.astype(np.float64)
        n += len(x64)
        total += x64.sum(axis=0)
        outer += x64.T @ x64
    mean = total / n
    return outer / n - np.outer(mean, mean)


def whitening_map(blocks: Blocks, channels: int, floor: float) -> np.ndarray:
    """``Σ^{-1/2}`` (C, C) symmetric, of the covariance of every position the blocks yield (one pass),
    eigenvalues floored at ``floor × mean eigenvalue``."""
    values, vectors = np.linalg.eigh(_covariance(blocks, channels))
    values = np.maximum(values, floor * max(float(values.mean()), 1e-12))
    return (vectors / np.sqrt(values)) @ vectors.T


def shared_precision(blocks: Blocks, channels: int, ridge: float = 1e-3) -> np.ndarray:
    """Inverse of the covariance (C, C) of every position the blocks yield (one pass), shrunk towards
    ``ridge × mean variance`` on the diagonal so that it exists for rank-deficient layers."""
    cov = _covariance(blocks, channels)
    cov[np.diag_indices(channels)] += ridge * max(float(np.trace(cov)) / channels, 1e-12)
    return np.linalg.inv(cov)


def logistic_1d(projection: np.ndarray, label: np.ndarray, C: float) -> tuple[float, float]:
    """Balanced logistic fit of labels (1 = concept) on a 1-D projection: returns (slope, intercept)."""
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
    clf.fit(projection[:, None], label)
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


def select_scores(
    blocks: Blocks, w: np.ndarray, b: np.ndarray, want: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decision values ``x·w_j + b_j`` of the positions of the images in ``want`` (n_img, J) bool, for
    every job in one pass (each block computes only the jobs that want one of its images): a list of
    J pairs (scores (n_j,) float64, image (n_j,) int64)."""
    parts: list[list] = [[] for _ in range(len(b))]
    w32 = w.T.astype(np.float32)  # (C, J)
    for x, image in blocks():
        ids, lengths = _runs(image)
        cols = np.flatnonzero(want[ids].any(axis=0))
        if not len(cols):
            continue
        z = (x @ w32[:, cols]).astype(np.float64) + b[cols]  # (m, k)
        keep = np.repeat(want[np.ix_(ids, cols)], lengths, axis=0)  # (m, k)
        for k, j in enumerate(cols):
            parts[j].append((z[keep[:, k], k], image[keep[:, k]]))
    return [
        (np.concatenate([s for s, _ in p]), np.concatenate([i for _, i in p]))
        if p
        else (np.zeros(0), np.zeros(0, np.int64))
        for p in parts
    ]
