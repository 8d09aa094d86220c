"""The contributions table's statistics: pooled spatial score, calibration, constant sides, direction,
the R >= 3 refusal and the power of the defaults."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sacv.config import ConceptsConfig, ConfigError, ScoreConfig, load_config
from sacv.report.build import _row_class, contributions_html, ordered_contributions
from sacv.stats.contributions import constant_sides_p, contributions, table_adjust

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def image_scores(vectors: dict[tuple[str, str, str], np.ndarray], layer: str = "l", target: int = 0) -> pd.DataFrame:
    """image_scores rows from {(concept, random_set, kind): (n_images, 3) relevant_frac, positive_frac, s_kc_sum}."""
    frames = []
    for (concept, random_set, kind), values in vectors.items():
        values = np.asarray(values, dtype=float)
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
                    "positive_frac": np.where(values[:, 0] > 0, values[:, 1], np.nan),
                    "s_kc_sum": values[:, 2],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def constant_vectors(concept_value: float, null_value: float, r: int = 5, n: int = 4, concept: str = "striped") -> dict:
    """R concept vectors and R null vectors whose every image has these positive fractions."""
    vectors = {(concept, f"random_{i}", "concept"): [[0.5, concept_value, 1.0]] * n for i in range(r)}
    vectors |= {(f"random_{i}", f"random_{(i + 1) % r}", "null"): [[0.5, null_value, -1.0]] * n for i in range(r)}
    return vectors


def test_spatial_score_pools_the_relevant_positions_of_every_image_of_the_class():
    # per image (relevant_frac, positive_frac, s_kc_sum); image 2 has no relevant position
    concept = [[0.5, 1.0, 2.0], [0.05, 0.0, -1.0], [0.0, np.nan, 1.0]]
    null = [[0.5, 0.5, 1.0], [0.5, 0.5, -1.0], [0.5, 0.5, 1.0]]
    vectors = {("striped", f"random_{i}", "concept"): concept for i in range(3)}
    vectors |= {(f"random_{i}", f"random_{(i + 1) % 3}", "null"): null for i in range(3)}
    row = contributions(image_scores(vectors), ["zebra"], min_images=1).iloc[0]
    assert row["spatial_score"] == pytest.approx((0.5 * 1.0 + 0.05 * 0.0) / (0.5 + 0.05))  # not mean(1.0, 0.0)
    assert row["spatial_score_null"] == pytest.approx(0.5)
    assert row["n_images"] == 3 and row["n_images_relevant"] == 2 and row["n_images_relevant_null"] == 3
    assert row["tcav_score"] == pytest.approx(2 / 3)


def test_constant_sides_p_is_the_exact_permutation_p_value():
    for n, m in [(3, 3), (4, 6), (5, 5), (6, 4), (2, 7)]:
        concept, null = np.full(n, 0.8), np.full(m, 0.3)
        pooled, observed = np.concatenate([concept, null]), concept.mean() - null.mean()
        splits = list(itertools.combinations(range(n + m), n))
        extreme = 0
        for chosen in splits:
            first = np.zeros(n + m, dtype=bool)
            first[list(chosen)] = True
            extreme += abs(pooled[first].mean() - pooled[~first].mean()) >= abs(observed) - 1e-12
        assert constant_sides_p(concept, null) == pytest.approx(extreme / len(splits)), (n, m)
    assert constant_sides_p(np.full(3, 0.5), np.full(4, 0.5)) == 1.0


def test_constant_sides_with_different_means_are_tested_by_permutation():
    row = contributions(image_scores(constant_vectors(0.9, 0.4)), ["zebra"], min_images=1).iloc[0]
    assert row["p_value"] == pytest.approx(2 / 252) and row["p_value_mannwhitney"] == pytest.approx(2 / 252)
    assert row["p_value_tcav"] == pytest.approx(2 / 252)  # TCAV 1.0 on every concept set, 0.0 on every null
    assert row["p_adjusted"] == pytest.approx(4 / 252)  # Holm over the row's two p-values
    assert row["reason"].startswith("no variance (spatial_score, tcav_score)")
    assert np.isnan(row["effect_size"]) and row["direction"] == "positive" and row["significant"]
    assert row["spatial_score"] - row["spatial_score_null"] == pytest.approx(0.5)
    same = contributions(image_scores(constant_vectors(0.4, 0.4)), ["zebra"], min_images=1, statistic="spatial").iloc[0]
    assert same["p_value"] == 1.0 and same["direction"] is None and not same["significant"]


def null_only_scores(rng, n_layers: int, r: int = 5, n_images: int = 10) -> pd.DataFrame:
    """Every layer its own concept and null vectors, all drawn alike (no effect); concept vectors are
    relevant on few images and few positions, null vectors on most."""
    frames = []
    for kind, relevant_share, n_vectors in (("concept", 0.3, r), ("null", 0.9, r)):
        shape = (n_layers, n_vectors, n_images)
        bias = rng.normal(0, 0.8, size=shape[:2] + (1,))  # per vector: how often its direction raises the logit
        relevant = np.where(rng.random(shape) < relevant_share, rng.uniform(0.02, 0.5, shape), 0.0)
        relevant[..., 0] = np.maximum(relevant[..., 0], 0.02)  # every vector has some relevant position
        positive = np.where(relevant > 0, 1 / (1 + np.exp(-(bias + rng.normal(0, 1, shape)))), np.nan)
        layer, vector, image = (a.reshape(-1) for a in np.indices(shape))
        frames.append(
            pd.DataFrame(
                {
                    "image_id": image.astype(str),
                    "layer": layer.astype(str),
                    "target": 0,
                    "concept": np.where(kind == "concept", "placebo", "random_" + vector.astype(str)),
                    "random_set": "random_" + ((vector + (kind == "null")) % n_vectors).astype(str),
                    "kind": kind,
                    "s_k_mean": 0.0,
                    "relevant_frac": relevant.reshape(-1),
                    "positive_frac": positive.reshape(-1),
                    "s_kc_sum": (bias + rng.normal(0, 1.5, shape)).reshape(-1),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_p_values_are_calibrated_under_the_null_over_many_seeds():
    n, alpha = 1200, 0.05  # independent rows: one per layer, each layer with its own null vectors
    table = contributions(null_only_scores(np.random.default_rng(7), n), ["c0"], alpha=alpha, min_images=3)
    assert len(table) == n and table["p_value"].notna().all() and table["p_value_tcav"].notna().all()
    bound = stats.binom.ppf(0.999, n, alpha) / n
    for column in ("p_value", "p_value_tcav", "p_value_mannwhitney"):
        rate = (table[column] < alpha).mean()
        assert 0.01 < rate <= bound, (column, rate, bound)
    per_row = np.array(
        [table_adjust([p], [q], "both", "holm")[0][0] for p, q in table[["p_value", "p_value_tcav"]].to_numpy()]
    )
    assert (per_row < alpha).mean() <= bound
    assert table["significant"].mean() <= bound  # Holm over the whole table


def planted_scores(rng, r: int = 6, n_images: int = 12) -> pd.DataFrame:
    """Concept `up` raises the class logit at its relevant positions, `down` lowers it, `flat` does neither."""
    vectors = {}
    for concept, centre in (("up", 0.85), ("down", 0.15), ("flat", 0.5)):
        for i in range(r):
            share = np.clip(centre + rng.normal(0, 0.03), 0, 1)
            vectors[concept, f"random_{i}", "concept"] = [[0.3, share, 1.0 if share > 0.5 else -1.0]] * n_images
    for i in range(r):
        share = rng.uniform(0.35, 0.65)
        vectors[f"random_{i}", f"random_{(i + 1) % r}", "null"] = [[0.4, share, rng.normal()]] * n_images
    return image_scores(vectors)


def test_direction_tells_raising_from_lowering_and_the_report_shows_them_apart():
    table = contributions(planted_scores(np.random.default_rng(3)), ["zebra"])
    rows = table.set_index("concept")
    assert rows.loc["up", "significant"] and rows.loc["up", "direction"] == "positive"
    assert rows.loc["down", "significant"] and rows.loc["down", "direction"] == "negative"
    assert not rows.loc["flat", "significant"]
    assert list(ordered_contributions(table.iloc[::-1])["concept"]) == ["up", "down", "flat"]
    assert [_row_class(row) for _, row in ordered_contributions(table).iterrows()] == ["sig", "sig neg", ""]
    page = contributions_html(ordered_contributions(table))
    assert page.index('<tr class="sig">') < page.index('<tr class="sig neg">')
    assert ">positive<" in page and ">negative<" in page


def _config_file(tmp_path: Path, random_sets: int, with_dataset: bool) -> Path:
    (tmp_path / "concepts").mkdir(exist_ok=True)
    (tmp_path / "data").mkdir(exist_ok=True)
    text = (
        f"run_dir: {tmp_path / 'run'}\nlayers: [features.2]\n"
        f"concepts: {{root: {tmp_path / 'concepts'}, random_sets: {random_sets}}}\n"
    )
    if with_dataset:
        text += f"dataset: {{root: {tmp_path / 'data'}}}\n"
    path = tmp_path / f"config_{random_sets}_{with_dataset}.yaml"
    path.write_text(text)
    return path


def test_fewer_than_three_random_sets_are_refused_when_a_contributions_table_is_built(tmp_path):
    for r in (1, 2):
        with pytest.raises(ConfigError) as err:
            load_config(_config_file(tmp_path, r, with_dataset=True))
        assert f"concepts.random_sets is {r}" in str(err.value) and "set concepts.random_sets to 3 or more" in str(
            err.value
        )
        assert load_config(_config_file(tmp_path, r, with_dataset=False)).concepts.random_sets == r  # fit only
    assert load_config(_config_file(tmp_path, 3, with_dataset=True)).concepts.random_sets == 3


def test_the_defaults_find_an_audit_size_effect_and_keep_placebos_below_alpha(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    power = importlib.import_module("power")
    rng = np.random.default_rng(11)
    x, y = rng.random(7), rng.random(9)
    assert power.welch(x, y) == pytest.approx(stats.ttest_ind(x, y, equal_var=False).pvalue)
    r = ConceptsConfig.model_fields["random_sets"].default
    score = ScoreConfig()
    # TCAV 0.87 against a null of 0.59 at 4 layers of a 200-row table, spreads of a real run
    result = power.simulate(rng, r, 0.28, (4, 10, 5), 120, power.MEASURED)
    found, placebo = result[score.statistic, score.correction]
    assert found >= 0.8 and placebo <= score.alpha, (r, score.statistic, found, placebo)
