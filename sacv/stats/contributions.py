"""Per-(layer, concept, class) contribution table, each concept tested against pseudo-concepts.

Every vector (a concept's vector for one random set, or a pseudo-concept's) gets per-set numbers for
class c, all over the same fixed image set, the n_images images whose target is c:

- ``contribution``: the mean ``S_{k→c}`` over the relevant positions (``f·v + b > 0``) of those
  images, pooled: ``Σ_i relevant_frac_i · s_kc_relevant_mean_i / Σ_i relevant_frac_i`` (every image
  has H·W positions). How much the concept, where it is, pushes the class logit. NaN when no image of
  the class has a relevant position;
- ``spatial``: pooled share of relevant positions with ``S_{k→c} > 0``, over the same positions;
- ``tcav``: share of the n images with ``s_kc_sum > 0`` (the whole-layer number a TCAV user knows).

**The test** (``score.statistic`` picks one of the three). A concept's value is the mean of its R
per-set values (its image set against each of the R random sets). Its reference is the P
pseudo-concepts of its family (``sacv.fit.fit_plan``): random image sets of the concept's size, each
fitted against the same R random sets, each summarised by the same mean. The null hypothesis, in
one sentence: *the concept's images move the class logit no differently from a set of as many
images drawn from the random pool.* Under it the concept's value is one more draw from the
distribution of the pseudo-concepts' values, so

- ``z = (value − mean(reference)) / sd(reference)``;
- ``p_value``: two-sided, from Student's t with P − 1 degrees of freedom for one more draw,
  ``|value − mean| / (sd · √(1 + 1/P))`` (a prediction interval);
- ``p_rank``: the two-sided rank p-value of the value among the reference (exact without any
  assumption on the distribution, but never below 2 / (P + 1)).

When the reference has no spread, ``p_value`` is ``p_rank`` and ``reason`` says so. ``p_adjusted``:
Holm or Benjamini-Hochberg across the table; ``significant = p_adjusted < alpha``; ``direction``:
``positive`` where the concept's value exceeds the reference mean (it raises the class logit more
than random images do), ``negative`` where it is lower.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

STATISTICS = ("contribution", "spatial", "tcav")
SCORE_COLUMN = {"contribution": "contribution_score", "spatial": "spatial_score", "tcav": "tcav_score"}  # in the table
MIN_REFERENCE = 3  # pseudo-concepts with a value that a row needs to be tested
TIE = 1e-12  # relative: reference values closer than this (times the scale) count as equal
CONTRIBUTION_COLUMNS = [
    "layer",
    "concept",
    "class_index",
    "class_name",
    "n_images",
    "n_images_relevant",
    "n_random_sets",
    "n_reference",
    "s_k_mean",
    "relevant_frac",
    "s_kc_sum_mean",
    "contribution_score",
    "spatial_score",
    "spatial_score_ci_low",
    "spatial_score_ci_high",
    "tcav_score",
    "statistic",
    "reference_mean",
    "reference_sd",
    "z",
    "p_value",
    "p_rank",
    "p_adjusted",
    "direction",
    "significant",
    "reason",
]
PSEUDO_PREFIX = "pseudo_"


def pseudo_name(index: int, concept: str | None = None) -> str:
    """Name of pseudo-concept ``index``: ``pseudo_<index>`` in the family every concept shares (a
    separate random pool), ``pseudo_<index>:<concept>`` in the family of one concept."""
    return f"{PSEUDO_PREFIX}{index}" if concept is None else f"{PSEUDO_PREFIX}{index}:{concept}"


def reference_of(concept: str, pseudo_names: pd.Series) -> np.ndarray:
    """Boolean mask over ``pseudo_names``: the pseudo-concepts ``concept`` is tested against (its own
    family when it has one, else the shared family)."""
    names = pseudo_names.astype(str)
    own = names.str.endswith(f":{concept}").to_numpy()
    return own if own.any() else ~names.str.contains(":", regex=False).to_numpy()


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


VECTOR_KEYS = ["layer", "target", "concept", "random_set", "kind"]  # one per-set value per key
PARTIAL_SUMS = [  # per key: sums over images, added across shards (``vector_partials``)
    "n_images",  # images (one row per image and vector)
    "n_images_relevant",  # images with a relevant position
    "relevant_sum",  # Σ relevant_frac
    "relevant_positive",  # Σ relevant_frac · positive_frac
    "relevant_contribution",  # Σ relevant_frac · s_kc_relevant_mean
    "kc_positive",  # images with s_kc_sum > 0
    "s_k_mean",  # Σ s_k_mean
    "relevant_frac",  # Σ relevant_frac (the image mean's numerator)
    "s_kc_sum",  # Σ s_kc_sum
]


def vector_partials(scores: pd.DataFrame) -> pd.DataFrame:
    """Per ``VECTOR_KEYS`` of image_scores rows: the sums ``PARTIAL_SUMS`` (float64; counts as
    int64). Sums over disjoint image sets add: the partials of a whole dataset are the sum of its
    shards' partials (``add_partials``), so its per-set values never need its rows in memory."""
    relevant = scores["relevant_frac"].to_numpy(dtype=float)
    frame = pd.DataFrame(
        {
            **{key: scores[key] for key in VECTOR_KEYS},
            "n_images": 1,
            "n_images_relevant": (relevant > 0).astype(np.int64),
            "relevant_sum": relevant,
            "relevant_positive": relevant * scores["positive_frac"].fillna(0.0).to_numpy(dtype=float),
            "relevant_contribution": relevant * scores["s_kc_relevant_mean"].fillna(0.0).to_numpy(dtype=float),
            "kc_positive": (scores["s_kc_sum"].to_numpy(dtype=float) > 0).astype(np.int64),
            "s_k_mean": scores["s_k_mean"].to_numpy(dtype=float),
            "relevant_frac": relevant,
            "s_kc_sum": scores["s_kc_sum"].to_numpy(dtype=float),
        }
    )
    return frame.groupby(VECTOR_KEYS, sort=True)[PARTIAL_SUMS].sum().reset_index()


def add_partials(parts: list) -> pd.DataFrame:
    """The partials of the union of disjoint image sets: ``parts`` (pandas frames or pyarrow tables)
    added key by key, in key order. Sums run in one thread, in the order given: the same parts give
    the same bits."""
    import pyarrow as pa

    tables = [p if isinstance(p, pa.Table) else pa.Table.from_pandas(p, preserve_index=False) for p in parts]
    tables = [t.select([*VECTOR_KEYS, *PARTIAL_SUMS]) for t in tables]
    summed = (
        pa.concat_tables(tables, promote_options="permissive")
        .group_by(VECTOR_KEYS, use_threads=False)
        .aggregate([(name, "sum") for name in PARTIAL_SUMS])
        .to_pandas()
        .rename(columns={f"{name}_sum": name for name in PARTIAL_SUMS})
    )
    return summed.sort_values(VECTOR_KEYS, kind="stable").reset_index(drop=True)[[*VECTOR_KEYS, *PARTIAL_SUMS]]


def per_vector_from_partials(partials: pd.DataFrame) -> pd.DataFrame:
    """One row per ``VECTOR_KEYS``: ``contribution``, ``spatial``, ``tcav`` and the image means of
    ``s_k_mean``, ``relevant_frac``, ``s_kc_sum`` over that class's images (module docstring), with
    ``n_images`` and ``n_images_relevant``."""
    table = partials[VECTOR_KEYS].copy()
    count = partials["n_images"].to_numpy(dtype=float)
    table["n_images"] = partials["n_images"].astype("int64")
    table["n_images_relevant"] = partials["n_images_relevant"].astype("int64")
    with np.errstate(invalid="ignore", divide="ignore"):
        table["tcav"] = partials["kc_positive"].to_numpy(dtype=float) / count
        for name in ("s_k_mean", "relevant_frac", "s_kc_sum"):
            table[name] = partials[name].to_numpy(dtype=float) / count
        weight = partials["relevant_sum"].to_numpy(dtype=float)
        pooled = weight > 0
        table["contribution"] = np.where(
            pooled, partials["relevant_contribution"].to_numpy(dtype=float) / weight, np.nan
        )
        table["spatial"] = np.where(pooled, partials["relevant_positive"].to_numpy(dtype=float) / weight, np.nan)
    return table.reset_index(drop=True)


def per_vector(scores: pd.DataFrame) -> pd.DataFrame:
    """:func:`per_vector_from_partials` of an image_scores frame held in memory."""
    return per_vector_from_partials(vector_partials(scores))


def set_means(vectors: pd.DataFrame, statistic: str) -> pd.Series:
    """Per concept or pseudo-concept (index), the mean of ``statistic`` over its random sets; NaN when
    none of its vectors has a value."""
    return vectors.groupby("concept", sort=True)[statistic].mean()


def reference_test(value: float, reference: np.ndarray) -> dict:
    """``value`` against the ``reference`` values (module docstring): reference mean and sd, z,
    p_value (t prediction), p_rank, reason."""
    reference = reference[~np.isnan(reference)]
    out = {"n_reference": len(reference), "reference_mean": np.nan, "reference_sd": np.nan, "z": np.nan}
    out |= {"p_value": np.nan, "p_rank": np.nan, "reason": None}
    if np.isnan(value):
        return {**out, "reason": "no relevant positions for the concept's vectors"}
    if len(reference) < MIN_REFERENCE:
        return {**out, "reason": f"fewer than {MIN_REFERENCE} pseudo-concepts with a value (concepts.pseudo_concepts)"}
    n = len(reference)
    mean, sd = float(reference.mean()), float(reference.std(ddof=1))
    tie = TIE * max(1.0, abs(mean), abs(value))  # scores equal but for rounding (e.g. shares of n images) are ties
    upper, lower = (1 + np.sum(reference >= value - tie)) / (n + 1), (1 + np.sum(reference <= value + tie)) / (n + 1)
    out |= {"reference_mean": mean, "reference_sd": sd, "p_rank": float(min(1.0, 2 * min(upper, lower)))}
    if np.ptp(reference) <= tie:
        return {**out, "p_value": out["p_rank"], "reason": "no spread in the reference: rank p-value"}
    t = abs(value - mean) / (sd * np.sqrt(1 + 1 / n))
    return {**out, "z": (value - mean) / sd, "p_value": float(2 * stats.t.sf(t, n - 1))}


def contributions(scores: pd.DataFrame, class_names: list[str], *settings, **named_settings) -> pd.DataFrame:
    """:func:`contribution_table` (same settings) of an ``image_scores`` frame held in memory."""
    return contribution_table(per_vector(scores), class_names, *settings, **named_settings)


def contribution_table(
    vectors: pd.DataFrame,
    class_names: list[str],
    alpha: float = 0.05,
    correction: str = "holm",
    min_images: int = 3,
    statistic: str = "contribution",
) -> pd.DataFrame:
    """The contributions table from the per-set values ``vectors`` (:func:`per_vector_from_partials`)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    rows = []
    for (layer, target), part in vectors.groupby(["layer", "target"], sort=True):
        pseudo = part[part["kind"] == "pseudo"]
        pseudo_means = set_means(pseudo, statistic)
        for concept, own in part[part["kind"] == "concept"].groupby("concept", sort=True):
            spatial, n_images = own["spatial"].to_numpy(), int(own["n_images"].max())
            mean = np.nanmean(spatial) if (~np.isnan(spatial)).any() else np.nan
            if len(spatial) > 1 and not np.isnan(spatial).any():
                half = stats.t.ppf(0.975, len(spatial) - 1) * spatial.std(ddof=1) / np.sqrt(len(spatial))
            else:
                half = np.nan
            value = float(own[statistic].mean())
            reference = pseudo_means[reference_of(concept, pseudo_means.index.to_series())].to_numpy(float)
            if n_images < min_images:
                tested = reference_test(np.nan, reference) | {"reason": f"too few images ({n_images} < {min_images})"}
            else:
                tested = reference_test(value, reference)
            rows.append(
                {
                    "layer": layer,
                    "concept": concept,
                    "class_index": int(target),
                    "class_name": class_names[int(target)],
                    "n_images": n_images,
                    "n_images_relevant": own["n_images_relevant"].mean(),
                    "n_random_sets": len(own),
                    "s_k_mean": own["s_k_mean"].mean(),
                    "relevant_frac": own["relevant_frac"].mean(),
                    "s_kc_sum_mean": own["s_kc_sum"].mean(),
                    "contribution_score": own["contribution"].mean(),
                    "spatial_score": mean,
                    "spatial_score_ci_low": mean - half,
                    "spatial_score_ci_high": mean + half,
                    "tcav_score": own["tcav"].mean(),
                    "statistic": statistic,
                    **tested,
                }
            )
    derived = ("p_adjusted", "direction", "significant")
    table = pd.DataFrame(rows, columns=[c for c in CONTRIBUTION_COLUMNS if c not in derived])
    table["n_reference"] = table["n_reference"].astype("int64")
    table["p_adjusted"] = adjust(table["p_value"].to_numpy(float), correction)
    difference = (table[SCORE_COLUMN[statistic]] - table["reference_mean"]).to_numpy(float)  # NaN: no direction
    table["direction"] = pd.Series(
        np.where(difference > 0, "positive", np.where(difference < 0, "negative", None)), dtype=object
    )
    table["significant"] = (table["p_adjusted"] < alpha).fillna(False).astype(bool)
    return table[CONTRIBUTION_COLUMNS]
