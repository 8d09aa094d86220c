"""Spatial Activation Concept Vectors: a linear classifier over per-position activations.

Every position (i, j) of a layer output (C, H, W) is one C-dim sample. Concept positions are
labelled 1, random positions 0, so the fitted normal ``v_k`` points **towards the concept**:
``f·v_k + b_k > 0`` means "the classifier sees the concept here".
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score


class NearChanceWarning(UserWarning):
    """A concept vector whose held-out balanced accuracy is close to chance."""


def spatial_samples(activations: np.ndarray | torch.Tensor, layout: str = "NHWC") -> tuple[np.ndarray, np.ndarray]:
    """Per-position samples of a batch of feature maps.

    activations: (N, H, W, C) (``layout="NHWC"``) or (N, C, H, W) (``layout="NCHW"``, permuted first).
    Returns ``samples`` (N*H*W, C) where row ``n*H*W + i*W + j`` is ``act[n, :, i, j]``, and
    ``image_index`` (N*H*W,) int64, the image each row came from.
    """
    act = torch.as_tensor(activations)
    if act.dim() != 4:
        raise ValueError(f"activations must be 4-D, got shape {tuple(act.shape)}")
    if layout == "NCHW":
        act = act.permute(0, 2, 3, 1)  # (N, H, W, C)
    elif layout != "NHWC":
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    n, h, w, c = act.shape
    samples = act.reshape(n * h * w, c).numpy()  # channels last: each row is one position's C-vector
    image_index = np.repeat(np.arange(n, dtype=np.int64), h * w)
    return samples, image_index


def grouped_validation_split(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: whole groups (images), drawn per class, both sides non-empty."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(y), dtype=bool)
    for label in (0, 1):
        label_groups = np.unique(groups[y == label])
        if len(label_groups) < 2:
            side = "concept" if label == 1 else "random"
            raise ValueError(
                f"the {side} set has {len(label_groups)} image(s); a validation split grouped by image "
                "needs at least 2 per side. Add images to the set."
            )
        n_val = min(len(label_groups) - 1, max(1, round(fraction * len(label_groups))))
        val_groups = rng.choice(label_groups, size=n_val, replace=False)
        is_val |= np.isin(groups, val_groups) & (y == label)
    return is_val


class SpatialConceptVector(ClassifierMixin, BaseEstimator):
    """Logistic-regression concept hyperplane over spatial activations (scikit-learn contract).

    ``fit(X, y, groups)`` with X (n, C) positions, y (n,) in {0, 1} (1 = concept), groups (n,)
    image ids. Positions of whole images are held out for validation. Learned attributes, all in the
    raw activation space (standardisation, if any, is folded back in):

    - ``coef_`` (C,) float64 raw normal, ``intercept_`` float: decision ``X @ coef_ + intercept_``;
    - ``vector_`` (C,) unit ``v_k = coef_ / norm_``; ``offset_`` ``b_k = intercept_ / norm_``, so
      ``X @ vector_ + offset_ > 0`` exactly where the classifier says concept;
    - ``metrics_``: n_pos, n_neg (training positions), n_val, acc, bal_acc, auroc (held out);
    - ``near_chance_``: held-out balanced accuracy below ``near_chance``.
    """

    def __init__(
        self,
        C: float = 1.0,
        standardize: bool = False,
        max_positions_per_class: int | None = None,
        validation_fraction: float = 0.25,
        near_chance: float = 0.6,
        max_iter: int = 2000,
        random_state: int = 0,
    ):
        self.C = C  # inverse L2 strength of the logistic regression
        self.standardize = standardize  # fit on z-scored channels, report in raw space
        self.max_positions_per_class = max_positions_per_class  # subsample training positions
        self.validation_fraction = validation_fraction  # share of images per side held out
        self.near_chance = near_chance  # warn below this held-out balanced accuracy
        self.max_iter = max_iter  # L-BFGS iterations
        self.random_state = random_state  # seeds the split, the subsample and the solver

    def fit(self, X, y, groups):
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y).astype(np.int64)
        groups = np.asarray(groups)
        if X.ndim != 2 or len(X) != len(y) or len(y) != len(groups):
            raise ValueError(f"X must be (n, C) with y and groups (n,); got {X.shape}, {y.shape}, {groups.shape}")
        if not np.isfinite(X).all():
            raise ValueError("activations contain NaN/inf; extract them again or drop the affected images")
        if not set(np.unique(y)) <= {0, 1} or len(np.unique(y)) < 2:
            raise ValueError("y must contain both labels: 1 for concept positions and 0 for random positions")
        if np.ptp(X, axis=0).max() == 0:
            raise ValueError("all positions are identical: concept and random activations cannot be separated")

        is_val = grouped_validation_split(y, groups, self.validation_fraction, self.random_state)
        train = np.flatnonzero(~is_val)
        if self.max_positions_per_class:
            rng = np.random.default_rng(self.random_state)
            keep = [rng.permutation(train[y[train] == c])[: self.max_positions_per_class] for c in (0, 1)]
            train = np.sort(np.concatenate(keep))
        w, b = fit_logistic(X[train], y[train], self.C, self.standardize, self.max_iter, self.random_state)
        n_pos, n_neg = int((y[train] == 1).sum()), int((y[train] == 0).sum())
        set_fitted_vector(self, w, b, y[is_val], X[is_val] @ w + b, n_pos, n_neg)
        return self

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_

    def predict(self, X) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(np.int64)


def fit_logistic(
    X: np.ndarray, y: np.ndarray, C: float, standardize: bool, max_iter: int, seed: int
) -> tuple[np.ndarray, float]:
    """Balanced L2 logistic regression (scikit-learn); returns the raw-space normal (C,) and intercept.

    With ``standardize`` the fit (and its L2 penalty) is in z-scored space, folded back afterwards.
    """
    mean = X.mean(axis=0) if standardize else np.zeros(X.shape[1])
    scale = X.std(axis=0) if standardize else np.ones(X.shape[1])
    scale[scale == 0] = 1.0
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, random_state=seed)
    clf.fit((X - mean) / scale, y)
    w = clf.coef_[0] / scale
    return w, float(clf.intercept_[0] - w @ mean)


def mann_whitney_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` (n,) for the (n,) bool mask ``positive`` in its Mann-Whitney form
    (mid-ranks: ties count one half), as scikit-learn's ``roc_auc_score`` computes it; NaN with
    one class only."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def held_out_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and AUROC of decision values ``scores`` (n,) against labels
    ``y`` (n,) in {0, 1}, predicting 1 where the score is > 0. The values of scikit-learn's
    ``accuracy_score``, ``balanced_accuracy_score`` and ``roc_auc_score`` (AUROC by mid-ranks, ties
    counted half), computed in numpy: scikit-learn's input checks cost about a millisecond per
    vector, seconds in a sweep. With one class only, scikit-learn decides (and warns or raises)."""
    y = np.asarray(y).astype(np.int64)
    pred = (np.asarray(scores) > 0).astype(np.int64)
    positives = y == 1
    n_pos = int(positives.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return {
            "acc": float(np.mean(pred == y)),
            "bal_acc": float(balanced_accuracy_score(y, pred)),
            "auroc": float(roc_auc_score(y, scores)),
        }
    return {
        "acc": float(np.mean(pred == y)),
        "bal_acc": float((np.mean(pred[positives] == 1) + np.mean(pred[~positives] == 0)) / 2),
        "auroc": mann_whitney_auc(np.asarray(scores), positives),
    }


def set_fitted_vector(
    est, w: np.ndarray, b: float, y_val: np.ndarray, val_scores: np.ndarray, n_pos: int, n_neg: int
) -> None:
    """Set the learned attributes shared by every SACV fitter, and warn when near chance."""
    est.coef_ = np.asarray(w, dtype=np.float64)  # (C,)
    est.intercept_ = float(b)
    est.norm_ = float(np.linalg.norm(est.coef_))
    if not np.isfinite(est.norm_) or est.norm_ < 1e-12:
        raise ValueError(
            "the fitted normal is zero: concept positions are indistinguishable from random ones. "
            "Check that the concept images really differ from the random set."
        )
    est.vector_ = est.coef_ / est.norm_
    est.offset_ = est.intercept_ / est.norm_
    est.classes_ = np.array([0, 1])
    est.n_features_in_ = len(est.coef_)
    est.metrics_ = {
        "n_pos": n_pos,
        "n_neg": n_neg,
        "n_val": int(len(y_val)),
        **held_out_metrics(y_val, val_scores),
        "norm": est.norm_,
    }
    est.near_chance_ = est.metrics_["bal_acc"] < est.near_chance
    if est.near_chance_:
        warnings.warn(
            f"concept vector is near chance: held-out balanced accuracy "
            f"{est.metrics_['bal_acc']:.3f} < {est.near_chance}. Its maps are not meaningful; "
            "try another layer, more or cleaner concept images, or check the activation layout.",
            NearChanceWarning,
            stacklevel=3,
        )


def fit_concept_vector(
    concept_activations: np.ndarray | torch.Tensor,
    random_activations: np.ndarray | torch.Tensor,
    **params,
) -> SpatialConceptVector:
    """Fit a SACV from concept (Nk, H, W, C) and random (Nr, H', W', C) activations (channels last)."""
    pos, pos_img = spatial_samples(concept_activations)
    neg, neg_img = spatial_samples(random_activations)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("the concept set and the random set each need at least one image")
    X = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    groups = np.concatenate([pos_img, neg_img + pos_img.max() + 1])
    return SpatialConceptVector(**params).fit(X, y, groups)
