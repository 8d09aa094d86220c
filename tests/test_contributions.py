"""The contributions table's statistics: pooled per-set scores, the test against pseudo-concepts
(against slow references), calibration under set-to-set spread, direction and sign, families, and
the refusal of concepts with too few images. Real-model calibration: tests/test_calibration.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sacv.fit.fit_plan import concept_positives, draw_pseudo_concepts
from sacv.report.contributions_view import contributions_html, ordered_contributions, row_class
from sacv.stats.contributions import contributions, per_vector, reference_test


def image_scores(vectors: dict[tuple[str, str, str], np.ndarray], layer: str = "l", target: int = 0) -> pd.DataFrame:
    """image_scores rows from {(concept, random_set, kind): (n_images, 4) relevant_frac, positive_frac,
    s_kc_sum, s_kc_relevant_mean}."""
    frames = []
    for (concept, random_set, kind), values in vectors.items():
        values = np.asarray(values, dtype=float)
        relevant = values[:, 0] > 0
        frames.append(
            pd.DataFrame(
                {
                    "image_id": [f"{layer}-{target}-{i}" for i in range(len(values))],
                    "layer": layer,
                    "target": target,
                    "concept": concept,
                    "random_set": random_set,
                    "kind": kind,
                    "s_k_mean": 0.0,
                    "relevant_frac": values[:, 0],
                    "positive_frac": np.where(relevant, values[:, 1], np.nan),
                    "s_kc_sum": values[:, 2],
                    "s_kc_relevant_mean": np.where(relevant, values[:, 3], np.nan),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def family(values: dict[str, float], r: int = 4, n: int = 3, noise: float = 0.0, seed: int = 0) -> dict:
    """Concepts and pseudo-concepts (names starting with ``pseudo_``), each R vectors whose images all
    have this contribution (plus ``noise`` per vector): relevant_frac 0.5, positive_frac 0.5."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in values.items():
        kind = "pseudo" if name.startswith("pseudo_") else "concept"
        for i in range(r):
            v = value + noise * rng.normal()
            out[name, f"random_{i}", kind] = [[0.5, 0.5, 1.0, v]] * n
    return out


def test_per_vector_pools_contribution_and_spatial_over_every_relevant_position():
    # per image (relevant_frac, positive_frac, s_kc_sum, s_kc_relevant_mean); image 2 has no relevant position
    images = [[0.5, 1.0, 2.0, 4.0], [0.05, 0.0, -1.0, -10.0], [0.0, np.nan, 1.0, np.nan]]
    table = per_vector(image_scores({("striped", "random_0", "concept"): images})).iloc[0]
    # slow reference: every relevant position of every image counts once
    positions = 100
    contribution, positive, count = 0.0, 0.0, 0
    for relevant_frac, positive_frac, _, relevant_mean in images:
        k = round(relevant_frac * positions)
        contribution += k * (0.0 if k == 0 else relevant_mean)
        positive += k * (0.0 if k == 0 else positive_frac)
        count += k
    assert table["contribution"] == pytest.approx(contribution / count)  # not the mean over images (-3.0)
    assert table["spatial"] == pytest.approx(positive / count)
    assert table["tcav"] == pytest.approx(2 / 3) and table["n_images"] == 3 and table["n_images_relevant"] == 2


def test_reference_test_equals_a_slow_prediction_interval_and_rank():
    rng = np.random.default_rng(5)
    reference, value = rng.normal(size=9), 1.7
    tested = reference_test(value, reference)
    n, mean, sd = len(reference), reference.mean(), reference.std(ddof=1)
    t = (value - mean) / (sd * np.sqrt(1 + 1 / n))
    assert tested["p_value"] == pytest.approx(2 * (1 - stats.t.cdf(abs(t), n - 1)))
    assert tested["z"] == pytest.approx((value - mean) / sd)
    above = sum(x >= value for x in reference)
    below = sum(x <= value for x in reference)
    assert tested["p_rank"] == pytest.approx(min(1, 2 * min(above + 1, below + 1) / (n + 1)))
    assert tested["n_reference"] == n and tested["reason"] is None


def test_a_reference_without_spread_gives_the_rank_p_value():
    tested = reference_test(2.0, np.ones(7))
    assert tested["p_value"] == pytest.approx(2 / 8) and "rank" in tested["reason"]
    assert reference_test(1.0, np.ones(7))["p_value"] == 1.0


def simulated_table(rng: np.random.Generator, placebos: int, r: int, p: int, set_sd: float, run_sd: float) -> dict:
    """Concepts and pseudo-concepts drawn alike: each image set has its own effect (set_sd), each of
    its R vectors adds run noise (run_sd), the way a fixed image set differs from the pool's average."""
    vectors = {}
    for name, kind in [(f"placebo_{i}", "concept") for i in range(placebos)] + [
        (f"pseudo_{i}", "pseudo") for i in range(p)
    ]:
        effect = set_sd * rng.normal()
        for i in range(r):
            vectors[name, f"random_{i}", kind] = [[0.5, 0.5, 1.0, effect + run_sd * rng.normal()]] * 2
    return vectors


def test_placebos_drawn_like_the_pseudo_concepts_are_significant_at_alpha():
    """Set-to-set spread larger than the runs' noise (as measured on real activations): the test
    against pseudo-concepts holds alpha; a Welch test of the same concepts' R values against R
    vectors of one pseudo-concept each (the replaced test) finds most placebos."""
    rng = np.random.default_rng(0)
    hits = welch_hits = rows = 0
    for _ in range(40):
        scores = image_scores(simulated_table(rng, placebos=10, r=10, p=40, set_sd=1.0, run_sd=0.3))
        table = contributions(scores, ["zebra"], min_images=1, correction="bh")
        hits += int((table["p_value"] < 0.05).sum())
        rows += len(table)
        vectors = per_vector(scores)
        singles = vectors[(vectors["kind"] == "pseudo") & (vectors["random_set"] == "random_0")]["contribution"][:10]
        for _, own in vectors[vectors["kind"] == "concept"].groupby("concept"):
            welch = stats.ttest_ind(own["contribution"], singles, equal_var=False).pvalue
            welch_hits += int(welch < 0.05)
    low, high = stats.binomtest(hits, rows).proportion_ci()
    assert low < 0.05 < high + 0.02 and hits / rows < 0.08, (hits, rows)
    assert welch_hits / rows > 0.3  # the replaced test: it tested these images, not the concept


def test_direction_tells_raising_from_lowering_and_the_report_shows_them_apart():
    pseudo = {f"pseudo_{i}": 0.1 * np.sin(i) for i in range(20)}
    table = contributions(
        image_scores(family({"up": 1.0, "down": -1.0, "flat": 0.0, **pseudo})), ["zebra"], min_images=1
    )
    rows = table.set_index("concept")
    assert rows.loc["up", "significant"] and rows.loc["up", "direction"] == "positive" and rows.loc["up", "z"] > 0
    assert rows.loc["down", "significant"] and rows.loc["down", "direction"] == "negative"
    assert not rows.loc["flat", "significant"]
    assert (rows["n_reference"] == 20).all() and (rows["statistic"] == "contribution").all()
    assert list(ordered_contributions(table.iloc[::-1])["concept"]) == ["up", "down", "flat"]
    assert [row_class(row) for _, row in ordered_contributions(table).iterrows()] == ["sig", "sig neg", ""]
    page = contributions_html(ordered_contributions(table))
    assert page.index('<tr class="sig">') < page.index('<tr class="sig neg">')
    assert ">positive<" in page and ">negative<" in page


def test_a_concept_is_tested_against_its_own_family_when_it_has_one():
    """Without a separate random pool each concept has its own pseudo-concepts (``pseudo_<p>:<concept>``)."""
    own = {f"pseudo_{i}:striped": 5.0 + 0.1 * np.cos(i) for i in range(6)}
    other = {f"pseudo_{i}:dotted": 0.1 * np.cos(i) for i in range(6)}
    table = contributions(
        image_scores(family({"striped": 5.0, "dotted": 0.0, **own, **other})), ["zebra"], min_images=1
    ).set_index("concept")
    assert table.loc["striped", "reference_mean"] == pytest.approx(np.mean(list(own.values())))
    assert not table.loc["striped", "significant"] and not table.loc["dotted", "significant"]


def test_too_few_images_and_no_relevant_positions_leave_a_reason():
    values = family({"striped": 1.0, **{f"pseudo_{i}": 0.1 * i for i in range(5)}}, n=1)
    row = contributions(image_scores(values), ["zebra"], min_images=3).iloc[0]
    assert np.isnan(row["p_value"]) and row["reason"] == "too few images (1 < 3)" and not row["significant"]
    values[("striped", "random_0", "concept")] = [[0.0, np.nan, 1.0, np.nan]]
    for i in range(1, 4):
        values[("striped", f"random_{i}", "concept")] = [[0.0, np.nan, 1.0, np.nan]]
    row = contributions(image_scores(values), ["zebra"], min_images=1).iloc[0]
    assert np.isnan(row["p_value"]) and "no relevant positions" in row["reason"]


def test_a_concept_with_fewer_images_than_a_set_needs_is_an_error_naming_the_key():
    images = [f"img{i}" for i in range(12)]
    with pytest.raises(ValueError, match=r"concepts.images_per_concept is 30.*12 or less"):
        concept_positives(images, 30, seed=0, concept="striped")
    drawn = concept_positives(images, 5, seed=0, concept="striped")
    assert len(set(drawn)) == 5 and set(drawn) <= set(images)
    assert drawn == concept_positives(images, 5, seed=0, concept="striped")  # seeded


def test_pseudo_concepts_avoid_the_random_sets_and_the_concept_when_the_pool_allows():
    pool = [f"r{i:03d}" for i in range(200)]
    negatives = [pool[i * 10 : (i + 1) * 10] for i in range(5)]
    family_sets = draw_pseudo_concepts(pool + ["c1"], {"c1"}, negatives, 10, 15, seed=0)
    members = [set(s) for s in family_sets]
    assert all(len(s) == 15 for s in members) and len(set().union(*members)) == 150  # disjoint
    assert not set().union(*members) & set().union(*map(set, negatives)) and "c1" not in set().union(*members)
    with pytest.raises(ValueError, match="concepts.images_per_concept"):
        draw_pseudo_concepts(pool[:8], set(), [pool[:4]], 3, 10, seed=0)


def test_too_few_concept_images_stop_the_run_before_any_work(tmp_path):
    from sacv.extract.extraction_plan import list_collections
    from tests.flow_helpers import make_config, write_collection

    write_collection(tmp_path)  # 5 images per concept
    config = make_config(tmp_path)
    config = config.model_copy(update={"concepts": config.concepts.model_copy(update={"images_per_concept": 6})})
    with pytest.raises(ValueError, match=r"'chequered' has 5 usable images, but concepts.images_per_concept is 6"):
        list_collections(config.run_dir, config)
    assert not (tmp_path / "run" / "scan").exists()  # nothing listed, nothing extracted
