"""Per-problem L-BFGS side by side (sacv.fit.lbfgs) and the batched logistic solver built on it:
planted minimisers, SciPy's L-BFGS-B per problem as the reference, problems that leave the batch
are not evaluated again, and jobs solved together equal jobs solved alone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from sacv.fit import solvers
from sacv.fit.lbfgs import minimize_batched


def quadratics(J: int, D: int, seed: int):
    """J convex quadratics ½ (x − a_j)ᵀ A_j (x − a_j), condition numbers 1 … 10^(0.6 (J−1))."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(J, D))
    A = np.empty((J, D, D))
    for j in range(J):
        Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
        A[j] = Q @ np.diag(np.logspace(0, 0.6 * j, D)) @ Q.T
    return a, A


def test_every_problem_reaches_its_planted_minimiser_and_leaves_the_batch_when_done():
    a, A = quadratics(J=6, D=30, seed=0)
    calls: list[np.ndarray] = []

    def evaluate(x, jobs):
        calls.append(jobs.copy())
        r = x - a[jobs]
        Ar = np.einsum("kde,ke->kd", A[jobs], r)
        return 0.5 * np.einsum("kd,kd->k", r, Ar), Ar

    result = minimize_batched(evaluate, np.zeros_like(a), max_iter=500, gtol=1e-9)
    np.testing.assert_allclose(result.x, a, atol=1e-6)
    assert (np.diff(result.n_iter) > 0).all()  # better conditioned problems stop earlier
    assert result.passes == len(calls) == result.n_eval.max()
    for j in range(len(a)):  # evaluated exactly n_eval times, never after it stopped
        seen = [k for k, jobs in enumerate(calls) if j in jobs]
        assert len(seen) == result.n_eval[j]
        assert seen == list(range(len(seen)))
    for j in range(len(a)):  # SciPy's L-BFGS-B on the same problem, alone: same point, iterations alike
        ref = minimize(
            lambda x, j=j: (0.5 * (x - a[j]) @ A[j] @ (x - a[j]), A[j] @ (x - a[j])),
            np.zeros(a.shape[1]),
            jac=True,
            method="L-BFGS-B",
            options={"gtol": 1e-9, "ftol": 64 * np.finfo(float).eps, "maxcor": 20, "maxiter": 500},
        )
        np.testing.assert_allclose(result.x[j], ref.x, atol=1e-6)
        assert result.n_iter[j] <= 1.5 * ref.nit + 3


def test_max_iter_stops_each_problem_and_a_start_at_the_minimum_costs_one_evaluation():
    a, A = quadratics(J=3, D=20, seed=1)

    def evaluate(x, jobs):
        r = x - a[jobs]
        Ar = np.einsum("kde,ke->kd", A[jobs], r)
        return 0.5 * np.einsum("kd,kd->k", r, Ar), Ar

    capped = minimize_batched(evaluate, np.zeros_like(a), max_iter=4, gtol=1e-12)
    assert (capped.n_iter <= 4).all() and not capped.converged[2]
    at_minimum = minimize_batched(evaluate, a.copy(), max_iter=100, gtol=1e-9)
    assert at_minimum.passes == 1 and (at_minimum.n_iter == 0).all() and at_minimum.converged.all()


def planted_jobs(seed: int, n_img: int = 36, per: int = 9, channels: int = 6, J: int = 5):
    """Positions of n_img images with a planted direction, and J jobs over different image subsets."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=channels)
    concept = np.arange(n_img) < n_img // 3
    x = rng.normal(size=(n_img, per, channels)) + 0.6 * concept[:, None, None] * direction
    weight = np.zeros((n_img, J))
    for j in range(J):  # each job: the concept images and its own random third of the others
        negatives = rng.choice(np.flatnonzero(~concept), size=n_img // 3, replace=False)
        weight[concept, j], weight[negatives, j] = 1.0, 1.0
    sign = np.where(concept[:, None], 1.0, -1.0) * np.ones((1, J))
    image = np.repeat(np.arange(n_img), per)
    x = x.reshape(-1, channels).astype(np.float32)
    counts = np.full(n_img, per)
    sums = x.astype(np.float64).reshape(n_img, per, channels).sum(axis=1)
    squares = (x.astype(np.float64) ** 2).reshape(n_img, per, channels).sum(axis=1)
    return x, image, weight, sign, counts, sums, squares


def solve(x, image, weight, sign, counts, sums, squares, block_images: int = 4):

    def blocks(wanted=None):  # whole images per block; skipping none (a producer may)
        for a in range(0, len(counts), block_images):
            rows = (image >= a) & (image < a + block_images)
            yield x[rows], image[rows]

    mean, scale = solvers.job_moments(weight > 0, sums, squares, counts)
    return solvers.batched_logistic(
        blocks, solvers.LogisticJobs(weight, sign, mean, scale, counts), 1.0, False, 500, 1e-9, threads=2
    )


@pytest.mark.parametrize("ragged", [False, True])
def test_jobs_solved_together_equal_each_job_solved_alone_and_scipy(ragged):
    x, image, weight, sign, counts, sums, squares = planted_jobs(seed=4)
    if ragged:  # images of unequal position counts
        keep = np.ones(len(x), bool)
        keep[np.flatnonzero(image % 3 == 0)[::4]] = False
        x, image = x[keep], image[keep]
        counts = np.bincount(image, minlength=len(counts))
        sums = np.zeros_like(sums)
        np.add.at(sums, image, x.astype(np.float64))
        squares = np.zeros_like(squares)
        np.add.at(squares, image, x.astype(np.float64) ** 2)
    w, b, n_iter, passes = solve(x, image, weight, sign, counts, sums, squares)
    assert len(set(n_iter.tolist())) > 1  # the jobs stopped at different iterations
    for j in range(weight.shape[1]):
        w1, b1, it1, _ = solve(x, image, weight[:, j : j + 1], sign[:, j : j + 1], counts, sums, squares)
        np.testing.assert_allclose(w[j], w1[0], rtol=1e-6, atol=1e-8)
        assert b[j] == pytest.approx(b1[0], rel=1e-6, abs=1e-8)
        # SciPy on the same objective in float64, job j alone: C Σ s log(1 + e^{-y z}) + ½‖w‖²
        rows = weight[image, j] > 0
        X, y, s = x[rows].astype(np.float64), sign[image[rows], j], weight[image[rows], j]

        def objective(p, X=X, y=y, s=s):
            z = X @ p[:-1] + p[-1]
            e = np.exp(-y * z)
            grad_z = -y * s * e / (1 + e)
            return (s * np.log1p(e)).sum() + 0.5 * p[:-1] @ p[:-1], np.r_[X.T @ grad_z + p[:-1], grad_z.sum()]

        ref = minimize(
            objective,
            np.zeros(X.shape[1] + 1),
            jac=True,
            method="L-BFGS-B",
            options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 2000},
        )
        np.testing.assert_allclose(np.r_[w[j], b[j]], ref.x, rtol=1e-5, atol=1e-6)


def test_the_preconditioner_whitens_the_positions_and_floors_flat_directions():
    rng = np.random.default_rng(2)
    mixing = rng.normal(size=(5, 5)) @ np.diag([10.0, 3.0, 1.0, 0.3, 0.1])
    x = (rng.normal(size=(4000, 5)) @ mixing.T + 2.0).astype(np.float32)  # correlated, off-centre
    image = np.repeat(np.arange(400), 10)

    def blocks():
        for a in range(0, len(x), 1000):
            yield x[a : a + 1000], image[a : a + 1000]

    P = solvers.whitening_map(blocks, 5, floor=1e-6)
    cov = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(P, P.T)
    np.testing.assert_allclose(P @ cov @ P, np.eye(5), atol=1e-8)
    floored = np.linalg.eigvalsh(
        np.linalg.inv(solvers.whitening_map(blocks, 5, floor=0.5) @ solvers.whitening_map(blocks, 5, floor=0.5))
    )
    assert floored.min() == pytest.approx(0.5 * np.linalg.eigvalsh(cov).mean())  # flat directions raised to the floor
