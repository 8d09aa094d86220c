"""Drift between two audits (or two runs): per (layer, concept, class), the change of the tested
statistic, tested against the changes of the pseudo-concepts.

Inputs are per-set tables (``tables/per_set.parquet``: one row per layer, target, concept, random
set and kind, with the per-set values ``contribution``, ``spatial`` and ``tcav``). Both sides
hold the same kinds of vectors: between two audits of one run the very same vectors (paired: the
same concept and pseudo-concept sets against the same random sets), between two runs the vectors
of each. A concept's change is the mean over its random sets after minus before; its reference is
the same change of each pseudo-concept of its family present on both sides. The null hypothesis, in
one sentence: *the concept's contribution to the class changed no more than that of a set of as
many random images.* ``z``, ``p_value`` (t prediction of one more draw) and ``p_rank`` as in
``sacv.stats.contributions``; ``p_adjusted``: ``score.correction`` across the table;
``significant = p_adjusted < score.alpha``. ``spatial_*`` and ``tcav_*`` describe; the test is on
``statistic``. Rows that cannot be tested keep null p-values and say why in ``reason``.
"""

from __future__ import annotations

import pandas as pd

from sacv.stats.contributions import adjust, reference_of, reference_test, set_means

DRIFT_COLUMNS = [
    "layer",
    "concept",
    "class_index",
    "class_name",
    "before",
    "after",
    "n_sets_before",
    "n_sets_after",
    "statistic",
    "value_before",
    "value_after",
    "change",
    "spatial_before",
    "spatial_after",
    "spatial_change",
    "tcav_before",
    "tcav_after",
    "tcav_change",
    "n_reference",
    "reference_sd",
    "z",
    "p_value",
    "p_rank",
    "p_adjusted",
    "significant",
    "reason",
]
KEYS = ["layer", "concept", "target"]


def _changes(before: pd.DataFrame, after: pd.DataFrame, statistic: str) -> pd.Series:
    """Per pseudo-concept on both sides: mean of ``statistic`` after minus before."""
    return (set_means(after, statistic) - set_means(before, statistic)).dropna()


def drift_table(
    before: pd.DataFrame,
    after: pd.DataFrame,
    class_names: list[str],
    alpha: float = 0.05,
    correction: str = "holm",
    labels: tuple[str, str] = ("before", "after"),
    statistic: str = "contribution",
) -> pd.DataFrame:
    """The drift table between two per-set tables; ``labels`` (e.g. two audit ids) fill the
    ``before`` / ``after`` columns. Sorted by the size of the change in reference SDs, largest first."""
    concepts = [side[side["kind"] == "concept"] for side in (before, after)]
    groups = [dict(tuple(side.groupby(KEYS, sort=True))) for side in concepts]
    pseudo = [side[side["kind"] == "pseudo"] for side in (before, after)]
    pseudo_by_class = [dict(tuple(side.groupby(["layer", "target"], sort=True))) for side in pseudo]
    rows = []
    for key in sorted(set(groups[0]) & set(groups[1])):
        old, new = groups[0][key], groups[1][key]
        layer, concept, target = key
        empty = pseudo[0].iloc[:0]
        reference = _changes(
            pseudo_by_class[0].get((layer, target), empty), pseudo_by_class[1].get((layer, target), empty), statistic
        )
        reference = reference[reference_of(concept, reference.index.to_series())].to_numpy(float)
        value_before, value_after = float(old[statistic].mean()), float(new[statistic].mean())
        tested = reference_test(value_after - value_before, reference)
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
                "statistic": statistic,
                "value_before": value_before,
                "value_after": value_after,
                "spatial_before": old["spatial"].mean(),
                "spatial_after": new["spatial"].mean(),
                "tcav_before": old["tcav"].mean(),
                "tcav_after": new["tcav"].mean(),
                **{k: tested[k] for k in ("n_reference", "reference_sd", "z", "p_value", "p_rank", "reason")},
            }
        )
    derived = ("change", "spatial_change", "tcav_change", "p_adjusted", "significant")
    table = pd.DataFrame(rows, columns=[c for c in DRIFT_COLUMNS if c not in derived])
    table["n_reference"] = table["n_reference"].astype("int64")
    table["change"] = table["value_after"] - table["value_before"]
    table["spatial_change"] = table["spatial_after"] - table["spatial_before"]
    table["tcav_change"] = table["tcav_after"] - table["tcav_before"]
    table["p_adjusted"] = adjust(table["p_value"].to_numpy(float), correction)
    table["significant"] = (table["p_adjusted"] < alpha).fillna(False).astype(bool)
    order = table["z"].abs().fillna(-1.0).sort_values(ascending=False, kind="stable").index
    return table.loc[order, DRIFT_COLUMNS].reset_index(drop=True)
