"""Per-(layer, concept, class) contribution table with TCAV-style significance against null vectors.

For the images whose target is class c and one layer, every vector gives one number per score:
the mean over those images. A concept has R numbers (one per random set), the null vectors theirs:

- ``spatial_score``: mean ``positive_frac`` (share of the concept's relevant positions that push the
  class logit up), averaged over random sets, with a 95 % t-interval over random sets;
- ``tcav_score``: share of images with ``s_kc_sum > 0`` (the whole-layer number a TCAV user knows);
- ``p_value``: two-sided Welch t-test of the concept's per-set spatial scores against the null
  vectors' (``p_value_mannwhitney``: Mann-Whitney U), adjusted across the table (Holm or
  Benjamini-Hochberg) into ``p_adjusted``; ``significant = p_adjusted < alpha``;
- ``effect_size``: Cohen's d of the same comparison.

Rows that cannot be tested keep ``p_value`` null and say why in ``reason``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

CONTRIBUTION_COLUMNS = [
    "layer", "concept", "class_index", "class_name", "n_images", "n_random_sets", "n_null",
    "s_k_mean", "relevant_frac", "s_kc_sum_mean", "spatial_score", "spatial_score_ci_low",
    "spatial_score_ci_high", "spatial_score_null", "tcav_score", "tcav_score_null", "p_value",
    "p_value_mannwhitney", "p_adjusted", "effect_size", "significant", "reason",
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


def _per_vector(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, target, concept, random_set, kind): means over that class's images."""
    keys = ["layer", "target", "concept", "random_set", "kind"]
    grouped = scores.assign(kc_positive=scores["s_kc_sum"] > 0).groupby(keys, sort=True)
    return grouped.agg(
        n_images=("image_id", "nunique"), spatial=("positive_frac", "mean"), tcav=("kc_positive", "mean"),
        s_k_mean=("s_k_mean", "mean"), relevant_frac=("relevant_frac", "mean"), s_kc_sum=("s_kc_sum", "mean"),
    ).reset_index()


def _test(concept: np.ndarray, null: np.ndarray, n_images: int, min_images: int) -> tuple[float, float, float, str | None]:
    if n_images < min_images:
        return np.nan, np.nan, np.nan, f"too few images ({n_images} < {min_images})"
    if np.isnan(concept).any() or np.isnan(null).any():
        return np.nan, np.nan, np.nan, "no relevant positions for some vectors"
    if len(concept) < 2 or len(null) < 2:
        return np.nan, np.nan, np.nan, "needs at least 2 random sets and 2 null vectors"
    spread = np.sqrt((concept.var(ddof=1) + null.var(ddof=1)) / 2)
    if spread == 0:
        return np.nan, np.nan, np.nan, "scores have no variance"
    with warnings.catch_warnings():  # nearly equal per-set scores: SciPy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p_t = float(stats.ttest_ind(concept, null, equal_var=False).pvalue)
        p_u = float(stats.mannwhitneyu(concept, null, alternative="two-sided").pvalue)
    return p_t, p_u, float((concept.mean() - null.mean()) / spread), None


def contributions(scores: pd.DataFrame, class_names: list[str], alpha: float = 0.05,
                  correction: str = "holm", min_images: int = 3) -> pd.DataFrame:
    """The contributions table from ``image_scores`` (see module docstring)."""
    per_vector = _per_vector(scores)
    rows = []
    for (layer, target), part in per_vector.groupby(["layer", "target"], sort=True):
        null = part[part["kind"] == "null"]
        for concept, own in part[part["kind"] == "concept"].groupby("concept", sort=True):
            spatial, n_images = own["spatial"].to_numpy(), int(own["n_images"].max())
            p_t, p_u, effect, reason = _test(spatial, null["spatial"].to_numpy(), n_images, min_images)
            if len(spatial) > 1 and not np.isnan(spatial).any():
                half = stats.t.ppf(0.975, len(spatial) - 1) * spatial.std(ddof=1) / np.sqrt(len(spatial))
            else:
                half = np.nan
            rows.append({
                "layer": layer, "concept": concept, "class_index": int(target), "class_name": class_names[int(target)],
                "n_images": n_images, "n_random_sets": len(own), "n_null": len(null),
                "s_k_mean": own["s_k_mean"].mean(), "relevant_frac": own["relevant_frac"].mean(),
                "s_kc_sum_mean": own["s_kc_sum"].mean(), "spatial_score": np.nanmean(spatial) if (~np.isnan(spatial)).any() else np.nan,
                "spatial_score_ci_low": np.mean(spatial) - half, "spatial_score_ci_high": np.mean(spatial) + half,
                "spatial_score_null": null["spatial"].mean(), "tcav_score": own["tcav"].mean(),
                "tcav_score_null": null["tcav"].mean(), "p_value": p_t, "p_value_mannwhitney": p_u,
                "effect_size": effect, "reason": reason,
            })
    table = pd.DataFrame(rows, columns=[c for c in CONTRIBUTION_COLUMNS if c not in ("p_adjusted", "significant")])
    table["p_adjusted"] = adjust(table["p_value"].to_numpy(dtype=float), correction)
    table["significant"] = (table["p_adjusted"] < alpha).fillna(False).astype(bool)
    return table[CONTRIBUTION_COLUMNS]
