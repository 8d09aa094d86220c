"""Drift between two audits (or two runs): per (layer, concept, class), the change of
``spatial_score`` and ``tcav_score`` with a test that accounts for both sides' random-set spread.

Inputs are per-set tables (``sacv.audit.audits.per_set_scores``: one row per layer, target, concept,
random set and kind, with the per-set means ``spatial`` and ``tcav``). For every concept row present
on both sides, two-sided Welch t-tests compare the R per-set values of ``spatial`` (``p_spatial``)
and of ``tcav`` (``p_tcav``) of the two sides. All 2m p-values of the table are adjusted together
(``score.correction``: Holm or Benjamini-Hochberg) into ``p_adjusted_spatial`` and
``p_adjusted_tcav``; ``significant``: either is below ``score.alpha``. Changes are after - before.
Rows that cannot be tested keep null p-values and say why in ``reason``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from sacv.stats.contributions import adjust

DRIFT_COLUMNS = [
    "layer",
    "concept",
    "class_index",
    "class_name",
    "before",
    "after",
    "n_sets_before",
    "n_sets_after",
    "spatial_before",
    "spatial_after",
    "spatial_change",
    "tcav_before",
    "tcav_after",
    "tcav_change",
    "p_spatial",
    "p_tcav",
    "p_adjusted_spatial",
    "p_adjusted_tcav",
    "significant",
    "reason",
]
KEYS = ["layer", "concept", "target"]


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, str | None]:
    if len(a) < 2 or len(b) < 2:
        return np.nan, "needs at least 2 random sets on each side"
    if np.isnan(a).any() or np.isnan(b).any():
        return np.nan, "no relevant positions for some vectors"
    if a.var(ddof=1) + b.var(ddof=1) == 0:
        return (1.0, None) if a.mean() == b.mean() else (0.0, None)  # no spread: any change is certain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue), None


def drift_table(
    before: pd.DataFrame,
    after: pd.DataFrame,
    class_names: list[str],
    alpha: float = 0.05,
    correction: str = "holm",
    labels: tuple[str, str] = ("before", "after"),
) -> pd.DataFrame:
    """The drift table between two per-set tables; ``labels`` (e.g. two audit ids) fill the
    ``before`` / ``after`` columns. Sorted by the size of the spatial change, largest first."""
    sides = [side[side["kind"] == "concept"] for side in (before, after)]
    groups = [dict(tuple(side.groupby(KEYS, sort=True))) for side in sides]
    rows = []
    for key in sorted(set(groups[0]) & set(groups[1])):
        old, new = groups[0][key], groups[1][key]
        p_spatial, reason = _welch(old["spatial"].to_numpy(float), new["spatial"].to_numpy(float))
        p_tcav, reason_tcav = _welch(old["tcav"].to_numpy(float), new["tcav"].to_numpy(float))
        layer, concept, target = key
        rows.append(
            {
                "layer": layer,
                "concept": concept,
                "class_index": int(target),
                "class_name": class_names[int(target)],
                "before": labels[0],
                "after": labels[1],
                "n_sets_before": len(old),
                "n_sets_after": len(new),
                "spatial_before": old["spatial"].mean(),
                "spatial_after": new["spatial"].mean(),
                "tcav_before": old["tcav"].mean(),
                "tcav_after": new["tcav"].mean(),
                "p_spatial": p_spatial,
                "p_tcav": p_tcav,
                "reason": reason or reason_tcav,
            }
        )
    table = pd.DataFrame(
        rows,
        columns=[
            c
            for c in DRIFT_COLUMNS
            if c not in ("spatial_change", "tcav_change", "p_adjusted_spatial", "p_adjusted_tcav", "significant")
        ],
    )
    table["spatial_change"] = table["spatial_after"] - table["spatial_before"]
    table["tcav_change"] = table["tcav_after"] - table["tcav_before"]
    adjusted = adjust(np.concatenate([table["p_spatial"].to_numpy(float), table["p_tcav"].to_numpy(float)]), correction)
    table["p_adjusted_spatial"], table["p_adjusted_tcav"] = adjusted[: len(table)], adjusted[len(table) :]
    table["significant"] = ((table["p_adjusted_spatial"] < alpha) | (table["p_adjusted_tcav"] < alpha)).astype(bool)
    order = table["spatial_change"].abs().sort_values(ascending=False, kind="stable").index
    return table.loc[order, DRIFT_COLUMNS].reset_index(drop=True)
