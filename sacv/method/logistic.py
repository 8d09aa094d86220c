"""The concept hyperplane's objective, written once for every solver that computes it.

A concept vector is the normal of a class-balanced, L2-penalised logistic regression of concept
positions (label +1) against random positions (label -1):

``f(w, b) = C Σ_i s_i log(1 + exp(-y_i (x_i·w + b))) + ½ Σ_c p_c w_c²``

with ``s_i = n / (2 n_{class(i)})`` (balanced weights, as scikit-learn's ``class_weight="balanced"``),
``p_c`` 1 (penalty on the raw normal) or the channel variance (penalty on the z-scored normal), and
the intercept ``b`` unpenalised. :func:`weighted_logistic` is its data term and derivative in the
decision values, :func:`l2_penalty` its penalty; the exact solvers (``sacv.fit.solvers`` for many
jobs at once, ``sacv.fit.per_job`` for one) chain them to gradients in their own parameters.
:func:`sacv.method.vectors.fit_logistic` minimises the same objective with scikit-learn, the
independent reference the tests hold the solvers to.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def logistic_terms(margin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise ``log(1 + e^-margin)`` (the logistic loss) and ``σ(-margin)`` (minus its
    derivative), float64, stable at any margin: equal to ``-log_expit(margin)`` and
    ``expit(-margin)``, computed as ``log1p(e^-|m|) + max(-m, 0)`` with the temporaries reused,
    in about half the time of those two (which took most of a pass of the exact fit over a block)."""
    negated = np.negative(margin)
    slope = expit(negated)
    loss = np.abs(margin)
    np.negative(loss, out=loss)
    np.exp(loss, out=loss)
    np.log1p(loss, out=loss)
    loss += np.maximum(negated, 0.0, out=negated)
    return loss, slope


def weighted_logistic(z: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The data term of the objective for positions grouped by image, and its derivative in ``z``.

    ``z`` (n, P, k) float64: decision values of the P positions of n images for k jobs;
    ``y`` (n, k) ±1 (+1: concept side) and ``s`` (n, k) balanced weights, per image and job (0 where
    the image does not train the job). Returns the loss per job ``Σ s log(1 + e^{-y z})`` (k,)
    float64 and ``d loss / d z`` (n, P, k) float64. One image per row with ``P = 1`` gives the
    per-position form."""
    terms, slope = logistic_terms(z * y[:, None])  # (n, P, k) log(1 + e^-margin), σ(-margin)
    slope *= (-y * s)[:, None]
    return (s * terms.sum(axis=1)).sum(axis=0), slope


def l2_penalty(w: np.ndarray, penalty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``½ Σ_c p_c w_c²`` per row of ``w`` (k, C) (or of one normal (C,)) and its gradient ``p w``;
    ``penalty`` (k, C) or (C,): 1 for the raw normal, the channel variance for the z-scored one."""
    return 0.5 * (penalty * w * w).sum(axis=-1), penalty * w
