"""Per-(layer, concept, class) contribution table with TCAV-style significance against null vectors.

Every vector (a concept's vector for one random set, or a null vector) gets two numbers per class c,
both over the same fixed image set, the n_images images whose target is c:

- ``spatial``: pooled share of relevant positions (``f·v + b > 0``) with ``S_{k→c} > 0``, i.e.
  ``Σ_i relevant_frac_i · positive_frac_i / Σ_i relevant_frac_i`` over all n images (every image has
  H·W positions). An image without relevant positions adds nothing to either sum; NaN only when no
  image of the class has one;
- ``tcav``: share of the n images with ``s_kc_sum > 0`` (the whole-layer number a TCAV user knows).

A concept has R per-set values of each, the layer's null vectors theirs. Per row, two-sided Welch
t-tests compare them (``p_value`` spatial, ``p_value_tcav``; ``p_value_mannwhitney``: Mann-Whitney U
on the spatial values). When both sides of a comparison are constant, the Welch test is undefined:
its p-value is then the exact permutation p-value of the difference in means (``reason`` says
``no variance``). ``statistic`` picks what is corrected across the table (Holm or Benjamini-Hochberg):
``spatial``, ``tcav`` or ``both`` (every row's two p-values in one family; a row's ``p_adjusted`` is
the smaller of its two). ``direction`` is the sign of concept minus null of the statistic behind
``p_adjusted``: ``positive`` (the concept raises the class logit more than a random direction does)
or ``negative``. ``significant = p_adjusted < alpha``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

STATISTICS = ("spatial", "tcav", "both")
CONTRIBUTION_COLUMNS = [
    "layer",
    "concept",
    "class_index",
    "class_name",
    "n_images",
    "n_images_relevant",
    "n_images_relevant_null",
    "n_random_sets",
    "n_null",
    "s_k_mean",
    "relevant_frac",
    "s_kc_sum_mean",
    "spatial_score",
    "spatial_score_ci_low",
    "spatial_score_ci_high",
    "spatial_score_null",
    "tcav_score",
    "tcav_score_null",
    "p_value",
    "p_value_tcav",
    "p_value_mannwhitney",
    "p_adjusted",
    "effect_size",
    "direction",
    "significant",
    "reason",
]


def adjust(p_values: np.ndarray, method: str) -> np.ndarray:
    """Holm (``holm``) or Benjamini-Hochberg (``bh``) adjusted p-values; NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    ranked = p[order]
    if method == "holm":
        values = np.maximum.accumulate((m - np.arange(m)) * ranked)
    elif method == "bh":
        values = np.minimum.accumulate((m / np.arange(1, m + 1) * ranked)[::-1])[::-1]
    else:
        raise ValueError(f"correction must be 'holm' or 'bh', got {method!r}")
    adjusted[order] = np.minimum(values, 1.0)
    return adjusted


def table_adjust(
    p_spatial: np.ndarray, p_tcav: np.ndarray, statistic: str, correction: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row adjusted p-values (m,) and which statistic gave each (m,) bool: True = tcav."""
    p_spatial, p_tcav = np.asarray(p_spatial, dtype=float), np.asarray(p_tcav, dtype=float)
    if statistic == "spatial":
        return adjust(p_spatial, correction), np.zeros(len(p_spatial), dtype=bool)
    if statistic == "tcav":
        return adjust(p_tcav, correction), np.ones(len(p_tcav), dtype=bool)
    if statistic != "both":
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    spatial, tcav = adjust(np.concatenate([p_spatial, p_tcav]), correction).reshape(2, -1)
    return np.fmin(spatial, tcav), np.isnan(spatial) | (tcav < spatial)


def constant_sides_p(concept: np.ndarray, null: np.ndarray) -> float:
    """Exact two-sided permutation p-value of mean(concept) − mean(null) when each side is constant.

    Relabelling the pooled values puts k of the n concept values into the first group, k
    hypergeometric; a split is as extreme as the observed one when |k/n − (n−k)/m| reaches 1.
    """
    n, m = len(concept), len(null)
    if concept[0] == null[0]:
        return 1.0
    k = np.arange(max(0, n - m), n + 1)
    extreme = np.abs(k / n - (n - k) / m) >= 1 - 1e-12
    return float(stats.hypergeom.pmf(k[extreme], n + m, n, n).sum())


def per_vector(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, target, concept, random_set, kind) from ``image_scores``: ``spatial``,
    ``tcav`` and image means over that class's images (see module docstring)."""
    keys = ["layer", "target", "concept", "random_set", "kind"]
    relevant = scores["relevant_frac"].to_numpy(dtype=float)
    frame = scores.assign(
        kc_positive=scores["s_kc_sum"] > 0,
        has_relevant=relevant > 0,
        relevant_positive=relevant * scores["positive_frac"].fillna(0.0),
    )
    table = (
        frame.groupby(keys, sort=True)
        .agg(
            n_images=("image_id", "nunique"),
            n_images_relevant=("has_relevant", "sum"),
            relevant_sum=("relevant_frac", "sum"),
            relevant_positive=("relevant_positive", "sum"),
            tcav=("kc_positive", "mean"),
            s_k_mean=("s_k_mean", "mean"),
            relevant_frac=("relevant_frac", "mean"),
            s_kc_sum=("s_kc_sum", "mean"),
        )
        .reset_index()
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        table["spatial"] = np.where(
            table["relevant_sum"] > 0, table["relevant_positive"] / table["relevant_sum"], np.nan
        )
    return table.drop(columns=["relevant_sum", "relevant_positive"])


def _compare(concept: np.ndarray, null: np.ndarray) -> tuple[float, float, float, bool]:
    """(Welch p, Mann-Whitney p, Cohen's d, constant) of concept vs null per-set values; exact
    permutation p-values (d NaN) when both sides are constant."""
    spread = np.sqrt((concept.var(ddof=1) + null.var(ddof=1)) / 2)
    if spread == 0:
        p = constant_sides_p(concept, null)
        return p, p, np.nan, True
    with warnings.catch_warnings():  # nearly equal per-set scores: SciPy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p_t = float(stats.ttest_ind(concept, null, equal_var=False).pvalue)
        p_u = float(stats.mannwhitneyu(concept, null, alternative="two-sided").pvalue)
    return p_t, p_u, float((concept.mean() - null.mean()) / spread), False


def _row_tests(own: pd.DataFrame, null: pd.DataFrame, n_images: int, min_images: int) -> dict:
    out = {
        "p_value": np.nan,
        "p_value_tcav": np.nan,
        "p_value_mannwhitney": np.nan,
        "effect_size": np.nan,
        "reason": None,
    }
    if n_images < min_images:
        return {**out, "reason": f"too few images ({n_images} < {min_images})"}
    if len(own) < 2 or len(null) < 2:
        return {**out, "reason": "needs at least 2 random sets and 2 null vectors (concepts.random_sets >= 3)"}
    reasons, constant = [], []
    spatial, spatial_null = own["spatial"].to_numpy(), null["spatial"].to_numpy()
    if np.isnan(spatial).any() or np.isnan(spatial_null).any():
        reasons.append("no relevant positions for some vectors")
    else:
        out["p_value"], out["p_value_mannwhitney"], out["effect_size"], flat = _compare(spatial, spatial_null)
        constant += ["spatial_score"] if flat else []
    out["p_value_tcav"], _, _, flat = _compare(own["tcav"].to_numpy(), null["tcav"].to_numpy())
    constant += ["tcav_score"] if flat else []
    if constant:
        reasons.append(f"no variance ({', '.join(constant)}): exact permutation p-value")
    return {**out, "reason": "; ".join(reasons) or None}


def contributions(
    scores: pd.DataFrame,
    class_names: list[str],
    alpha: float = 0.05,
    correction: str = "holm",
    min_images: int = 3,
    statistic: str = "both",
) -> pd.DataFrame:
    """The contributions table from ``image_scores`` (see module docstring)."""
    vectors = per_vector(scores)
    rows = []
    for (layer, target), part in vectors.groupby(["layer", "target"], sort=True):
        null = part[part["kind"] == "null"]
        for concept, own in part[part["kind"] == "concept"].groupby("concept", sort=True):
            spatial, n_images = own["spatial"].to_numpy(), int(own["n_images"].max())
            mean = np.nanmean(spatial) if (~np.isnan(spatial)).any() else np.nan
            if len(spatial) > 1 and not np.isnan(spatial).any():
                half = stats.t.ppf(0.975, len(spatial) - 1) * spatial.std(ddof=1) / np.sqrt(len(spatial))
            else:
                half = np.nan
            rows.append(
                {
                    "layer": layer,
                    "concept": concept,
                    "class_index": int(target),
                    "class_name": class_names[int(target)],
                    "n_images": n_images,
                    "n_images_relevant": own["n_images_relevant"].mean(),
                    "n_images_relevant_null": null["n_images_relevant"].mean(),
                    "n_random_sets": len(own),
                    "n_null": len(null),
                    "s_k_mean": own["s_k_mean"].mean(),
                    "relevant_frac": own["relevant_frac"].mean(),
                    "s_kc_sum_mean": own["s_kc_sum"].mean(),
                    "spatial_score": mean,
                    "spatial_score_ci_low": mean - half,
                    "spatial_score_ci_high": mean + half,
                    "spatial_score_null": null["spatial"].mean(),
                    "tcav_score": own["tcav"].mean(),
                    "tcav_score_null": null["tcav"].mean(),
                    **_row_tests(own, null, n_images, min_images),
                }
            )
    table = pd.DataFrame(
        rows, columns=[c for c in CONTRIBUTION_COLUMNS if c not in ("p_adjusted", "direction", "significant")]
    )
    table["p_adjusted"], tcav = table_adjust(table["p_value"], table["p_value_tcav"], statistic, correction)
    difference = np.where(
        tcav, table["tcav_score"] - table["tcav_score_null"], table["spatial_score"] - table["spatial_score_null"]
    )
    table["direction"] = pd.Series(
        np.where(difference > 0, "positive", np.where(difference < 0, "negative", None)), dtype=object
    )
    table["significant"] = (table["p_adjusted"] < alpha).fillna(False).astype(bool)
    return table[CONTRIBUTION_COLUMNS]
