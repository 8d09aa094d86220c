"""Scoring and contributions: numbers against numpy, calibration, streamed = blockwise, DuckDB, config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner
from scipy import stats

from flows.pipeline import run_pipeline
from flows.score import run_score
from sacv.cli import main
from sacv.io.rundir import RunDir
from sacv.method.maps import concept_maps
from sacv.score.scoring import summarize_maps
from sacv.stats.contributions import adjust, contributions
from tests.flow_helpers import pipeline_config, write_collection


@pytest.fixture(scope="module")
def scored(tmp_path_factory, prefect):
    root = write_collection(tmp_path_factory.mktemp("scored"), n_per_concept=5, n_per_class=5)
    config = pipeline_config(root, "run")
    summary = run_pipeline(config)
    return root, config, summary


def test_image_scores_equal_a_direct_numpy_computation(scored):
    _, config, _ = scored
    run = Path(config.run_dir)
    scores = RunDir(str(run)).read_table("image_scores")
    store = zarr.open_group(str(run / "store.zarr"), mode="r")
    rng = np.random.default_rng(0)
    for layer in config.layers:
        v, b = store[f"vectors/{layer}/v"][...], store[f"vectors/{layer}/b"][...]
        for row in rng.choice(store["dataset/targets"].shape[0], size=3, replace=False):
            act = store[f"dataset/{layer}/act"][row].astype(np.float64)  # (H, W, C)
            grad = store[f"dataset/{layer}/grad"][row].astype(np.float64)
            for k in rng.choice(len(v), size=4, replace=False):
                h, w, _ = act.shape
                s_k = np.array([[act[i, j] @ v[k] for j in range(w)] for i in range(h)])
                s_kc = np.array([[grad[i, j] @ v[k] for j in range(w)] for i in range(h)])
                relevant = s_k + b[k] > 0
                got = scores[(scores["layer"] == layer) & (scores["row"] == row) & (scores["vector_row"] == k)].iloc[0]
                assert got["target"] == store["dataset/targets"][row]
                assert got["s_k_max"] == pytest.approx(s_k.max(), rel=1e-4, abs=1e-5)
                assert got["s_k_mean"] == pytest.approx(s_k.mean(), rel=1e-4, abs=1e-5)
                assert got["s_kc_sum"] == pytest.approx(s_kc.sum(), rel=1e-4, abs=1e-7)
                assert got["relevant_frac"] == pytest.approx(relevant.mean())
                if relevant.any():
                    assert got["positive_frac"] == pytest.approx((s_kc[relevant] > 0).mean())
                    assert got["s_kc_relevant_mean"] == pytest.approx(s_kc[relevant].mean(), rel=1e-4, abs=1e-7)
                else:
                    assert np.isnan(got["positive_frac"])
                assert (got["argmax_i"], got["argmax_j"]) == np.unravel_index(np.argmax(s_k), s_k.shape)


TIE = 1e-12  # relative: values closer than this are equal (rounding of means of discrete scores)


def _per_set(part: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """Per vector, by hand over its rows: contribution (mean S_kc over every relevant position of the
    class's images), spatial score (share of those positions with S_kc > 0), TCAV score, images with
    a relevant position. Each image has the layer's H·W positions, so relevant_frac weighs it."""
    rows = {}
    for name, vector in part.groupby(key):
        weight, contribution, positive, relevant_images = 0.0, 0.0, 0.0, 0
        for _, image in vector.iterrows():
            if image["relevant_frac"] > 0:
                weight += image["relevant_frac"]
                contribution += image["relevant_frac"] * image["s_kc_relevant_mean"]
                positive += image["relevant_frac"] * image["positive_frac"]
                relevant_images += 1
        rows[name] = {
            "contribution": contribution / weight if weight else np.nan,
            "spatial": positive / weight if weight else np.nan,
            "tcav": np.mean([x > 0 for x in vector["s_kc_sum"]]),
            "relevant_images": relevant_images,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def _prediction_test(value: float, reference: list[float]) -> dict:
    """The concept's value as one more draw from the pseudo-concepts' values: z, t prediction p-value
    (P - 1 degrees of freedom, scipy.stats.t), two-sided rank p-value; the rank p-value without spread.
    Values that differ only by rounding (TCAV scores are multiples of 1 / images, and the mean of
    0.4, 0.0, 0.2 is not the float the mean of 0.6, 0.0, 0.0 is) are equal: ties, no spread."""
    n = len(reference)
    mean = sum(reference) / n
    scale = TIE * max(1.0, abs(mean), abs(value))
    sd = (sum((x - mean) ** 2 for x in reference) / (n - 1)) ** 0.5
    above, below = sum(x >= value - scale for x in reference), sum(x <= value + scale for x in reference)
    rank = min(1.0, 2 * min(above + 1, below + 1) / (n + 1))
    if max(reference) - min(reference) <= scale:
        return {"reference_mean": mean, "reference_sd": sd, "z": np.nan, "p_value": rank, "p_rank": rank}
    t = abs(value - mean) / (sd * (1 + 1 / n) ** 0.5)
    p = 2 * stats.t.sf(t, n - 1)
    return {"reference_mean": mean, "reference_sd": sd, "z": (value - mean) / sd, "p_value": p, "p_rank": rank}


def _holm(p: np.ndarray) -> np.ndarray:
    order, m = np.argsort(p, kind="stable"), len(p)
    adjusted, running = np.empty(m), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def _expected_table(scores: pd.DataFrame, table: pd.DataFrame, statistic: str) -> pd.DataFrame:
    """Every row of ``table`` recomputed from image_scores: per-vector values by hand, the concept's
    mean over its random sets against the means of its own pseudo-concepts (``pseudo_<p>:<concept>``:
    this collection has no separate random pool)."""
    expected = []
    for _, row in table.iterrows():
        mine = scores[(scores["layer"] == row["layer"]) & (scores["target"] == row["class_index"])]
        concept = _per_set(mine[(mine["concept"] == row["concept"]) & (mine["kind"] == "concept")], ["random_set"])
        pseudo = mine[mine["kind"] == "pseudo"]
        family = pseudo[pseudo["concept"].str.split(":").str[1] == row["concept"]]
        per_pseudo = _per_set(family, ["concept", "random_set"])
        reference = [float(np.nanmean(group)) for _, group in per_pseudo.groupby(level=0)[statistic]]
        spatial = concept["spatial"].to_numpy()
        low, high = (
            stats.t.interval(0.95, len(spatial) - 1, loc=spatial.mean(), scale=stats.sem(spatial))
            if spatial.std() > 0
            else (spatial.mean(),) * 2
        )
        value = float(np.nanmean(concept[statistic]))
        expected.append(
            {
                "n_images": mine["image_id"].nunique(),
                "n_random_sets": len(concept),
                "n_reference": len(reference),
                "n_images_relevant": concept["relevant_images"].mean(),
                "contribution_score": concept["contribution"].mean(),
                "spatial_score": spatial.mean(),
                "spatial_score_ci_low": low,
                "spatial_score_ci_high": high,
                "tcav_score": concept["tcav"].mean(),
                "value": value,
                **_prediction_test(value, reference),
            }
        )
    return pd.DataFrame(expected)


def test_contribution_columns_equal_a_slow_reference_on_a_pipeline_table(scored):
    _, config, summary = scored
    run = Path(config.run_dir)
    scores = RunDir(str(run)).read_table("image_scores")
    table = pd.read_parquet(run / "tables/contributions.parquet")
    assert summary.score.rows == len(table) == 2 * 3 * 2  # layers x concepts x classes
    assert config.score.statistic == "contribution" and config.score.correction == "holm"
    assert (scores.loc[scores["kind"] == "pseudo", "concept"].str.fullmatch(r"pseudo_[0-2]:\w+")).all()
    expected = _expected_table(scores, table, "contribution")
    assert (expected["n_reference"] == config.concepts.pseudo_concepts).all()
    assert expected["p_value"].notna().all() and expected["z"].notna().all()
    for column in expected.columns.drop("value"):
        np.testing.assert_allclose(
            table[column].to_numpy(dtype=float),
            expected[column].to_numpy(dtype=float),
            rtol=1e-9,
            atol=1e-12,
            err_msg=column,
        )
    assert (table["statistic"] == "contribution").all() and table["reason"].isna().all()
    adjusted = _holm(expected["p_value"].to_numpy())
    np.testing.assert_allclose(table["p_adjusted"], adjusted, rtol=1e-12)
    difference = expected["value"] - expected["reference_mean"]
    assert list(table["direction"]) == ["positive" if d > 0 else "negative" for d in difference]
    assert list(table["significant"]) == list(adjusted < config.score.alpha)
    assert expected["p_value"].nunique() == len(expected)  # twelve different tests, not one repeated
    names = list(map(str, range(5)))
    bh = contributions(scores, names, config.score.alpha, "bh", config.score.min_images, "contribution")
    np.testing.assert_allclose(bh["p_adjusted"], stats.false_discovery_control(expected["p_value"]), rtol=1e-12)
    for statistic in ("spatial", "tcav"):  # the other statistics: the same test on their values
        other = contributions(scores, names, config.score.alpha, "holm", config.score.min_images, statistic)
        reference = _expected_table(scores, other, statistic)
        for column in ("reference_mean", "reference_sd", "z", "p_value", "p_rank"):
            np.testing.assert_allclose(
                other[column].to_numpy(dtype=float),
                reference[column].to_numpy(dtype=float),
                rtol=1e-9,
                atol=1e-12,
                err_msg=f"{statistic} {column}",
            )
        no_spread = reference["z"].isna()  # the reference's values all equal
        assert (other.loc[no_spread.to_numpy(), "reason"] == "no spread in the reference: rank p-value").all()


def test_pseudo_concepts_equal_up_to_rounding_have_no_spread():
    """TCAV scores are multiples of 1 / images: three pseudo-concepts whose per-set TCAV scores are
    (0.4, 0, 0.2), (0.6, 0, 0) and (0.6, 0, 0) all have the mean 0.2, though the floats differ in the
    last bit. The reference has no spread: the rank p-value (0.5 for a value above all three), not a
    t prediction from a standard deviation of 4e-17 (z ~ 3e15, p ~ 1e-31: significant)."""
    per_set = {"striped": (0.6, 0.2, 0.2), "pseudo_0": (0.4, 0.0, 0.2), "pseudo_1": (0.6, 0.0, 0.0)}
    per_set["pseudo_2"] = per_set["pseudo_1"]
    rows = []
    for concept, shares in per_set.items():
        for r, share in enumerate(shares):
            for i in range(5):  # 5 images, round(share * 5) of them with s_kc_sum > 0
                rows.append(
                    {
                        "image_id": f"img{i}",
                        "layer": "l",
                        "target": 0,
                        "concept": concept,
                        "random_set": f"random_{r}",
                        "kind": "pseudo" if concept.startswith("pseudo_") else "concept",
                        "s_k_mean": 0.0,
                        "relevant_frac": 0.5,
                        "positive_frac": 0.5,
                        "s_kc_sum": 1.0 if i < round(share * 5) else -1.0,
                        "s_kc_relevant_mean": 0.1,
                    }
                )
    row = contributions(pd.DataFrame(rows), ["zebra"], min_images=1, statistic="tcav").iloc[0]
    assert row["tcav_score"] == pytest.approx(1 / 3) and row["reference_mean"] == pytest.approx(0.2)
    assert row["p_rank"] == 0.5 and row["p_value"] == 0.5 and not row["significant"], row.to_dict()
    assert row["reason"] == "no spread in the reference: rank p-value"


def test_streamed_scores_equal_blockwise_scores(scored):
    _, config, _ = scored
    blockwise = RunDir(config.run_dir).read_table("image_scores")
    streamed_config = config.model_copy(update={"score": config.score.model_copy(update={"mode": "streamed"})})
    assert run_score(streamed_config).shards_scored == 3  # 10 images in shards of 4; the mode is in the key
    streamed = RunDir(config.run_dir).read_table("image_scores")
    pd.testing.assert_frame_equal(streamed, blockwise, check_exact=False, rtol=1e-5, atol=1e-7)


def test_duckdb_reads_the_tables_like_pandas(scored):
    duckdb = pytest.importorskip("duckdb")
    _, config, _ = scored
    path = Path(config.run_dir) / "tables/contributions.parquet"
    query = f"""
        SELECT layer, concept, count(*) AS n, avg(tcav_score) AS tcav, sum(n_images) AS images
        FROM read_parquet('{path}') GROUP BY layer, concept ORDER BY layer, concept"""
    got = duckdb.sql(query).df()
    table = pd.read_parquet(path)
    expected = (
        table.groupby(["layer", "concept"])
        .agg(n=("class_index", "size"), tcav=("tcav_score", "mean"), images=("n_images", "sum"))
        .reset_index()
    )
    np.testing.assert_array_equal(got[["layer", "concept"]].to_numpy(), expected[["layer", "concept"]].to_numpy())
    np.testing.assert_allclose(
        got[["n", "tcav", "images"]].to_numpy(dtype=float), expected[["n", "tcav", "images"]].to_numpy(dtype=float)
    )


def synthetic_scores(
    rng, n_classes: int, per_class: int, planted_class: int | None, n_sets: int = 3, placebos: int = 0, pseudo: int = 8
):
    """image_scores from `summarize_maps` on random activations/gradients. Each concept or pseudo-concept
    has R vectors scattered around one direction of its own (as one image set fitted against R random
    sets): concept ``striped`` (when ``planted_class`` is set) around u, along which that class's
    gradients point; ``placebos`` concepts and ``pseudo`` pseudo-concepts (the shared family
    ``pseudo_<p>``) around random directions."""
    c, h = 16, 4
    u = rng.normal(size=c)
    u /= np.linalg.norm(u)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    names = (["striped"] if planted_class is not None else []) + [f"placebo_{i}" for i in range(placebos)]
    blocks = [(name, "concept") for name in names] + [(f"pseudo_{p}", "pseudo") for p in range(pseudo)]
    # every concept or pseudo-concept is one image set: its R vectors scatter around one direction
    bases = [u if name == "striped" else unit(rng.normal(size=(1, c)))[0] for name, _ in blocks]
    directions = [unit(base + 0.3 * rng.normal(size=(n_sets, c))) for base in bases]
    vectors = np.concatenate(directions)
    frames = []
    for cls in range(n_classes):
        act = rng.normal(size=(per_class, h, h, c)) + 0.5 * u
        grad = rng.normal(size=(per_class, h, h, c)) + (2.0 * u if cls == planted_class else 0)
        summary = summarize_maps(concept_maps(act, vectors, np.zeros(len(vectors)), grad))
        for k in range(len(vectors)):
            name, kind = blocks[k // n_sets]
            frames.append(
                pd.DataFrame(
                    {
                        "image_id": [f"{cls}-{i}" for i in range(per_class)],
                        "layer": "l",
                        "target": cls,
                        "concept": name,
                        "random_set": f"random_{k % n_sets}",
                        "kind": kind,
                        **{column: values[:, k] for column, values in summary.items()},
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def test_significance_is_calibrated_under_the_null():
    """Placebo concepts drawn like the pseudo-concepts, three seeds of 12 classes x 10 placebos: raw
    p-values roughly uniform (neither too many small ones nor too few), BH leaves at most alpha
    significant. Over 15 seeds the share below 0.05 averaged 0.051 (0.025 to 0.108 per seed)."""
    tables = []
    for seed in range(3):
        scores = synthetic_scores(
            np.random.default_rng(seed), 12, per_class=6, planted_class=None, placebos=10, pseudo=10
        )
        tables.append(contributions(scores, [f"c{i}" for i in range(12)], alpha=0.05, correction="bh"))
    table = pd.concat(tables, ignore_index=True)
    assert len(table) == 360 and table["p_value"].notna().all() and (table["n_reference"] == 10).all()
    assert 0.02 <= (table["p_value"] < 0.05).mean() <= 0.09
    assert 0.4 < table["p_value"].mean() < 0.6 and 0.12 < (table["p_value"] < 0.2).mean() < 0.28
    assert table["significant"].mean() <= 0.05


def test_a_planted_concept_is_significant_for_its_class_only():
    rng = np.random.default_rng(1)
    scores = synthetic_scores(rng, n_classes=8, per_class=8, planted_class=3, n_sets=5, pseudo=10)
    table = contributions(scores, [f"c{i}" for i in range(8)], alpha=0.05, correction="holm")
    planted = table[table["class_index"] == 3].iloc[0]
    assert planted["significant"] and planted["direction"] == "positive" and planted["z"] > 3
    assert planted["contribution_score"] > planted["reference_mean"] + 3 * planted["reference_sd"]
    assert planted["spatial_score"] > 0.8 and planted["tcav_score"] > 0.9
    others = table[table["class_index"] != 3]
    assert not others["significant"].any()
    assert planted["z"] > others["z"].abs().max() and planted["p_value"] < others["p_value"].min()


def test_classes_with_too_few_images_get_a_reason_not_an_error():
    scores = synthetic_scores(np.random.default_rng(2), n_classes=2, per_class=2, planted_class=None, placebos=1)
    table = contributions(scores, ["a", "b"], min_images=3)
    assert len(table) == 2 and table["p_value"].isna().all() and not table["significant"].any()
    assert (table["reason"] == "too few images (2 < 3)").all()


def test_holm_and_benjamini_hochberg_match_hand_computations():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.2])
    # Holm: sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08->0.09, 0.2
    np.testing.assert_allclose(adjust(p, "holm"), [0.04, 0.09, np.nan, 0.09, 0.2])
    # BH: 0.01*4/1, 0.03*4/2, 0.04*4/3, 0.2*4/4 -> min from the right: 0.04, 0.0533, 0.0533, 0.2
    np.testing.assert_allclose(adjust(p, "bh"), [0.04, 0.16 / 3, np.nan, 0.16 / 3, 0.2])


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_errors_name_the_key_and_the_fix(tmp_path, prefect):
    runner = CliRunner()
    root = write_collection(tmp_path / "c", n_per_concept=3, n_per_class=2)
    base = f"run_dir: {tmp_path / 'run'}\nmodel: {{spec: 'tests.models:small'}}\n"
    cases = {
        "unknown key": (
            base + f"layers: [features.2]\nconcepts: {{root: {root / 'concepts'}, nmes: [a]}}\n",
            "unknown key 'concepts.nmes': did you mean 'names'?",
        ),
        "wrong type": (
            base + "layers: [features.2]\nextract: {batch_size: many}\n",
            "'extract.batch_size': Input should be a valid integer",
        ),
        "missing folder": (
            base + f"layers: [features.2]\ndataset: {{root: {tmp_path / 'nowhere'}}}\n",
            f"folder {tmp_path / 'nowhere'} does not exist",
        ),
        "unknown layer": (
            base + f"layers: [feature.2]\ndataset: {{root: {root / 'data'}}}\n",
            "unknown layer 'feature.2'; closest layer names: ['features.2'",
        ),
    }
    for name, (text, message) in cases.items():
        result = runner.invoke(main, ["run", _write(tmp_path / f"{name}.yaml", text)])
        assert result.exit_code == 1, (name, result.output)
        assert message in result.output, (name, result.output)


def test_stored_maps_equal_the_maps_from_activations_and_vectors(scored):
    from sacv.method.maps import concept_maps

    _, config, _ = scored
    with_maps = config.model_copy(update={"score": config.score.model_copy(update={"store_maps": True})})
    run_score(with_maps)
    store = zarr.open_group(str(Path(config.run_dir) / "store.zarr"), mode="r")
    for layer in config.layers:
        act, grad = store[f"dataset/{layer}/act"][...], store[f"dataset/{layer}/grad"][...]
        expected = concept_maps(
            act.astype(np.float32),
            store[f"vectors/{layer}/v"][...],
            store[f"vectors/{layer}/b"][...],
            grad.astype(np.float32),
        )
        s_k, s_kc = store[f"maps/{layer}/S_k"], store[f"maps/{layer}/S_kc"]
        assert s_k.shape == expected.s_k.shape and s_k.dtype == np.float16 and s_k.chunks[0] == 4
        np.testing.assert_allclose(s_k[...], expected.s_k, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(s_kc[...].astype(np.float32), expected.s_kc, rtol=2e-3, atol=1e-6)
