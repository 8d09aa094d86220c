"""L-BFGS for many independent problems at once, each with its own history, step and stopping.

J separable problems ``min f_j(x_j)``, ``x_j`` in R^D, are solved side by side: every iteration
computes each running problem's search direction by the two-loop recursion (vectorised over the
problems), and one call of ``evaluate`` gives the objective and gradient of every problem's next
trial point. A problem leaves the batch when its gradient is small enough, it stalls, or it
used its iterations, so later passes evaluate only the problems still running (the cost of a pass
over shared data falls as problems converge). The line search is backtracking on the Armijo
condition, enough for the strictly convex objectives it serves; a pair with ``s·y ≤ 0`` is not
stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# evaluate(x (k, D) float64, jobs (k,) int64) -> (f (k,) float64, g (k, D) float64)
Evaluate = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

ARMIJO = 1e-4  # sufficient decrease: f(x + t d) <= f(x) + ARMIJO t g·d
MAX_BACKTRACKS = 30  # halvings of the step before a problem counts as stalled


@dataclass
class BatchedResult:
    """``x`` (J, D) the minimisers; per problem: ``n_iter`` (J,) iterations, ``n_eval`` (J,)
    evaluations of that problem, ``converged`` (J,) bool (gradient below ``gtol``); ``passes``: calls
    of ``evaluate`` (each a pass over the data it reads)."""

    x: np.ndarray
    n_iter: np.ndarray
    n_eval: np.ndarray
    converged: np.ndarray
    passes: int


def _directions(g: np.ndarray, S: np.ndarray, Y: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``-H g`` by the two-loop recursion for k problems at once. ``g`` (k, D); ``S``, ``Y``
    (k, m, D) the stored pairs, oldest first (unused slots are zero with ``rho`` 0, so they change
    nothing); ``rho`` (k, m) = 1 / s·y."""
    q = g.copy()
    m = S.shape[1]
    alpha = np.zeros(rho.shape)
    for i in range(m - 1, -1, -1):  # newest to oldest
        alpha[:, i] = rho[:, i] * np.einsum("kd,kd->k", S[:, i], q)
        q -= alpha[:, i, None] * Y[:, i]
    sy, yy = np.einsum("kd,kd->k", S[:, -1], Y[:, -1]), np.einsum("kd,kd->k", Y[:, -1], Y[:, -1])
    gamma = np.where(rho[:, -1] > 0, sy / np.where(yy > 0, yy, 1.0), 1.0)  # scale of the initial Hessian
    r = gamma[:, None] * q
    for i in range(m):  # oldest to newest
        beta = rho[:, i] * np.einsum("kd,kd->k", Y[:, i], r)
        r += S[:, i] * (alpha[:, i] - beta)[:, None]
    return -r


def minimize_batched(
    evaluate: Evaluate,
    x0: np.ndarray,
    max_iter: int,
    gtol: float,
    ftol: float = 64 * np.finfo(float).eps,
    memory: int = 20,
) -> BatchedResult:
    """Minimise J independent smooth convex objectives from ``x0`` (J, D).

    Each call of ``evaluate`` takes the next trial point of every running problem, whether it starts
    an iteration or backtracks, so the passes are as many as the evaluations of the problem that
    needs most. A problem stops when ``max |g_j| ≤ gtol`` (converged), when an accepted step lowers
    ``f_j`` by at most ``ftol · max(|f|, |f_new|, 1)`` or no step satisfies the Armijo condition
    (stalled: the objective no longer moves in float64), or after ``max_iter`` iterations — the
    stopping rules of SciPy's L-BFGS-B, per problem.
    """
    x = np.array(x0, dtype=np.float64)
    J, D = x.shape
    f, g = evaluate(x, np.arange(J))
    passes, n_eval = 1, np.ones(J, np.int64)
    S, Y, rho = np.zeros((J, memory, D)), np.zeros((J, memory, D)), np.zeros((J, memory))
    d, slope, step = np.zeros((J, D)), np.zeros(J), np.zeros(J)
    n_iter, backtracks = np.zeros(J, np.int64), np.zeros(J, np.int64)
    converged = np.abs(g).max(axis=1) <= gtol
    running = ~converged & (max_iter > 0)

    def new_directions(jobs: np.ndarray) -> None:
        d[jobs] = _directions(g[jobs], S[jobs], Y[jobs], rho[jobs])
        slope[jobs] = np.einsum("kd,kd->k", g[jobs], d[jobs])
        uphill = jobs[slope[jobs] >= 0]  # a lost direction (rounding): restart from steepest descent
        d[uphill], slope[uphill] = -g[uphill], -np.einsum("kd,kd->k", g[uphill], g[uphill])
        fresh = rho[jobs, -1] == 0  # no stored pair yet: the first step is bounded as SciPy's is
        step[jobs] = np.where(fresh, np.minimum(1.0, 1.0 / np.linalg.norm(d[jobs], axis=1)), 1.0)
        backtracks[jobs] = 0

    new_directions(np.flatnonzero(running))
    while running.any():
        k = np.flatnonzero(running)
        trial = x[k] + step[k, None] * d[k]
        f_t, g_t = evaluate(trial, k)
        passes += 1
        n_eval[k] += 1
        ok = np.isfinite(f_t) & (f_t <= f[k] + ARMIJO * step[k] * slope[k])
        rejected = k[~ok]
        backtracks[rejected] += 1
        step[rejected] *= 0.5
        stalled = rejected[backtracks[rejected] >= MAX_BACKTRACKS]  # flat in float64 along d
        running[stalled] = False
        a = k[ok]  # accepted: store the pair, move, and check the stopping rules
        s, yv = trial[ok] - x[a], g_t[ok] - g[a]
        sy = np.einsum("kd,kd->k", s, yv)
        keep = sy > 1e-12 * np.linalg.norm(s, axis=1) * np.linalg.norm(yv, axis=1)
        u = a[keep]
        S[u], Y[u], rho[u] = np.roll(S[u], -1, axis=1), np.roll(Y[u], -1, axis=1), np.roll(rho[u], -1, axis=1)
        S[u, -1], Y[u, -1], rho[u, -1] = s[keep], yv[keep], 1.0 / sy[keep]
        flat = f[a] - f_t[ok] <= ftol * np.maximum(np.maximum(np.abs(f[a]), np.abs(f_t[ok])), 1.0)
        x[a], f[a], g[a] = trial[ok], f_t[ok], g_t[ok]
        n_iter[a] += 1
        converged[a] = np.abs(g[a]).max(axis=1) <= gtol
        running[a] = ~converged[a] & ~flat & (n_iter[a] < max_iter)
        new_directions(a[running[a]])
    return BatchedResult(x, n_iter, n_eval, converged, passes)
