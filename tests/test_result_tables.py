"""The result stage as a reduction: per-shard partial sums and extreme images add up to what the whole
image table gives (every column), the built tables equal the in-memory computation on a real run,
the image_scores dataset is scanned with filters pushed down by every engine, and a rerun repairs
missing aggregates and drops the scores of shards that left the dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sacv
from flows.pipeline import run_pipeline
from sacv.audit.digest import audit_digest
from sacv.audit.drift import DRIFT_COLUMNS
from sacv.errors import NotYetRun
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import class_names_of
from sacv.score.scoring import SCORE_COLUMNS
from sacv.score.tables import TOP_MEANS, build_tables, extreme_images, image_means, rank_images
from sacv.stats.contributions import (
    add_partials,
    contribution_table,
    contributions,
    per_vector,
    per_vector_from_partials,
    vector_partials,
)
from tests.flow_helpers import pipeline_config, write_collection


def synthetic_scores(rng: np.random.Generator, n_images: int, classes: int = 3) -> pd.DataFrame:
    """image_scores rows (the real columns) for 2 layers × (2 concepts + 3 pseudo-concepts) × 3 random
    sets; a third of the images have no relevant position for a vector (NaN means); ties in s_kc_sum."""
    vectors = [
        (concept, f"random_{r}", kind)
        for concept, kind in [("striped", "concept"), ("dotted", "concept")]
        + [(f"pseudo_{p}", "pseudo") for p in range(3)]
        for r in range(3)
    ]
    frames = []
    for layer in ("a", "b"):
        for k, (concept, random_set, kind) in enumerate(vectors):
            relevant = np.where(rng.random(n_images) < 0.33, 0.0, rng.random(n_images))
            frames.append(
                pd.DataFrame(
                    {
                        "image_id": [f"img{i}" for i in range(n_images)],
                        "row": np.arange(n_images, dtype=np.int64),
                        "layer": layer,
                        "concept": concept,
                        "random_set": random_set,
                        "kind": kind,
                        "vector_row": k,
                        "target": np.arange(n_images, dtype=np.int64) % classes,
                        "s_k_max": rng.normal(size=n_images),
                        "s_k_mean": rng.normal(size=n_images),
                        "relevant_frac": relevant,
                        "s_kc_sum": np.round(rng.normal(size=n_images), 1),  # ties
                        "s_kc_relevant_mean": np.where(relevant > 0, rng.normal(size=n_images), np.nan),
                        "positive_frac": np.where(relevant > 0, rng.random(n_images), np.nan),
                        "argmax_i": 0,
                        "argmax_j": 0,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)[SCORE_COLUMNS]


def shards_of(scores: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """The rows of each block of ``size`` images (the way a run shards its dataset)."""
    block = scores["row"] // size
    return [part for _, part in scores.groupby(block, sort=True)]


def reference_per_vector(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, target, concept, random_set, kind), by hand over its images: the pooled
    contribution and spatial score, the TCAV share and the image means."""
    rows = []
    for key, part in scores.groupby(["layer", "target", "concept", "random_set", "kind"], sort=True):
        weight = part["relevant_frac"].sum()
        rows.append(
            {
                **dict(zip(["layer", "target", "concept", "random_set", "kind"], key)),
                "n_images": part["image_id"].nunique(),
                "n_images_relevant": int((part["relevant_frac"] > 0).sum()),
                "tcav": float((part["s_kc_sum"] > 0).mean()),
                "s_k_mean": part["s_k_mean"].mean(),
                "relevant_frac": part["relevant_frac"].mean(),
                "s_kc_sum": part["s_kc_sum"].mean(),
                "contribution": (part["relevant_frac"] * part["s_kc_relevant_mean"].fillna(0)).sum() / weight
                if weight > 0
                else np.nan,
                "spatial": (part["relevant_frac"] * part["positive_frac"].fillna(0)).sum() / weight
                if weight > 0
                else np.nan,
            }
        )
    return pd.DataFrame(rows)


def assert_same_columns(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Every column equal: text and integers exactly, floats to 1e-12 (sums in another order)."""
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected)
    for column in expected.columns:
        a, b = got[column].reset_index(drop=True), expected[column].reset_index(drop=True)
        if pd.api.types.is_float_dtype(b):
            np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-12, atol=1e-15, err_msg=column)
        else:
            pd.testing.assert_series_equal(a, b, check_names=False, check_dtype=False, obj=column)


@pytest.mark.parametrize("shard_size", [1, 7, 32, 200])
def test_partials_added_over_shards_give_the_per_set_values_of_the_whole_table(shard_size):
    scores = synthetic_scores(np.random.default_rng(shard_size), 150)
    added = add_partials([vector_partials(part) for part in shards_of(scores, shard_size)])
    assert_same_columns(per_vector_from_partials(added), reference_per_vector(scores))


def test_contribution_table_from_shard_partials_equals_the_one_from_the_whole_table():
    scores = synthetic_scores(np.random.default_rng(1), 120)
    added = add_partials([vector_partials(part) for part in shards_of(scores, 16)])
    reduced = contribution_table(per_vector_from_partials(added), ["cat", "dog", "zebra"], min_images=2)
    whole = contributions(scores, ["cat", "dog", "zebra"], min_images=2)
    assert_same_columns(reduced, whole)
    assert whole["p_value"].notna().all()  # rows were tested, not only passed through


@pytest.mark.parametrize("k", [1, 3, 10])
def test_extremes_of_shards_are_the_first_and_last_k_of_the_whole_ranking(k):
    scores = synthetic_scores(np.random.default_rng(k), 90)
    merged = extreme_images(pd.concat([extreme_images(image_means(part), k) for part in shards_of(scores, 8)]), k)
    for (layer, concept, target), group in image_means(scores).groupby(["layer", "concept", "target"]):
        # the slow ranking: highest mean s_kc_sum first, ties by row
        ranking = sorted(group.itertuples(), key=lambda r: (-r.s_kc_sum, r.row))
        expected = [r.row for r in ranking[:k]] + [r.row for r in ranking[max(k, len(ranking) - k) :]]
        mine = merged[(merged["layer"] == layer) & (merged["concept"] == concept) & (merged["target"] == target)]
        assert list(mine["row"]) == expected
        np.testing.assert_allclose(
            mine["s_kc_sum"], [group.set_index("row").loc[r, "s_kc_sum"] for r in expected], rtol=1e-12
        )
    assert set(merged["concept"]) == {"striped", "dotted"}  # pseudo-concepts are never ranked


@pytest.fixture(scope="module")
def scored(tmp_path_factory, prefect):
    root = write_collection(tmp_path_factory.mktemp("tables"), n_per_concept=5, n_per_class=5)
    config = pipeline_config(root, "run")
    config = config.model_copy(update={"extract": config.extract.model_copy(update={"shard_size": 4})})
    run_pipeline(config)
    return config


def test_built_tables_equal_the_in_memory_computation_of_a_real_run(scored):
    run = RunDir(scored.run_dir)
    assert len(run.scored_shards()) >= 3  # a reduction over several shards
    scores = run.read_table("image_scores")
    assert_same_columns(run.read_table("per_set"), per_vector(scores))
    score = scored.score
    expected = contributions(
        scores, class_names_of(run.store_uri), score.alpha, score.correction, score.min_images, score.statistic
    )
    assert_same_columns(run.read_table("contributions"), expected)


def test_top_images_from_the_table_equal_a_scan_of_image_scores(scored):
    run = sacv.open_run(scored.run_dir)
    table = run.table("contributions")
    assert len(table) >= 4
    for _, row in table.iterrows():
        key = (row["layer"], row["concept"], int(row["class_index"]))
        scan = run.top_images(*key, n=None)  # ranks every image of the class from image_scores
        assert len(scan) == row["n_images"]
        for lowest in (False, True):
            got = run.top_images(*key, n=3, lowest=lowest)
            expected = (scan.iloc[::-1] if lowest else scan).head(3).reset_index(drop=True)
            pd.testing.assert_frame_equal(got, expected)
        assert scan["s_kc_sum"].is_monotonic_decreasing


@pytest.mark.parametrize("engine", ["pandas", "pyarrow", "duckdb", "dask"])
def test_image_scores_scans_push_filters_and_columns_down_in_every_engine(scored, engine):
    run = sacv.open_run(scored.run_dir)
    whole = run.table("image_scores")
    layer, concept, target = whole.iloc[0][["layer", "concept", "target"]]
    expected = whole[(whole["layer"] == layer) & (whole["concept"] == concept) & (whole["target"] == target)]
    columns = ["row", "random_set", "s_kc_sum"]
    got = run.table("image_scores", engine, columns=columns, layer=layer, concept=concept, class_=int(target))
    got = {
        "pandas": lambda g: g,
        "pyarrow": lambda g: g.to_table(columns=columns).to_pandas(),
        "duckdb": lambda g: g.df(),
        "dask": lambda g: g.compute(),
    }[engine](got)
    order = ["row", "random_set"]
    pd.testing.assert_frame_equal(
        got.sort_values(order).reset_index(drop=True),
        expected[columns].sort_values(order).reset_index(drop=True),
        check_dtype=False,
    )
    assert 0 < len(expected) < len(whole)


def test_a_filter_on_an_unknown_column_names_the_columns(scored):
    with pytest.raises(KeyError, match="no column 'concpet'.*close: \\['concept'\\]"):
        sacv.open_run(scored.run_dir).table("image_scores", concpet="striped")


def test_a_rebuild_repairs_missing_aggregates_and_drops_shards_that_left(scored):
    run = RunDir(scored.run_dir)
    shards = run.scored_shards()
    before = {name: run.read_table(name) for name in ("per_set", "contributions", "top_images")}
    run_path = Path(scored.run_dir)
    (run_path / f"score_sums/{shards[0]:06d}.parquet").unlink()  # scored before aggregates were kept
    stale = max(shards) + 5  # a shard whose images all left the dataset
    scores = run.read_shard_scores(shards[-1])
    run.write_shard_scores(stale, scores, "old", vector_partials(scores), extreme_images(image_means(scores)))
    build_tables(scored.run_dir, scored, shards)
    assert (run_path / f"score_sums/{shards[0]:06d}.parquet").is_file()
    assert stale not in run.scored_shards() and not (run_path / f"score_top/{stale:06d}.parquet").exists()
    for name, table in before.items():
        pd.testing.assert_frame_equal(run.read_table(name), table)
    assert len(run.read_table("image_scores")) == sum(len(run.read_shard_scores(s)) for s in shards)
    assert list(run.read_table("top_images").columns[-len(TOP_MEANS) :]) == TOP_MEANS
    assert rank_images(run.read_table("top_images")).equals(run.read_table("top_images"))


def test_a_run_scored_before_the_dataset_listing_reads_its_single_file(scored, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(scored.run_dir, old)
    whole = RunDir(str(old)).read_table("image_scores")
    (old / "tables/image_scores.json").unlink()
    (old / "tables/top_images.parquet").unlink()
    whole.to_parquet(old / "tables/image_scores.parquet", index=False)  # as earlier versions wrote it
    run = sacv.open_run(str(old))
    assert "image_scores" in run.table_names()
    pd.testing.assert_frame_equal(run.table("image_scores"), whole)
    row = run.table("contributions").iloc[0]
    key = (row["layer"], row["concept"], int(row["class_index"]))
    assert len(run.top_images(*key, n=3)) == min(3, row["n_images"])  # a scan: no top_images table
    RunDir(str(old)).forget_score_tables()  # what compaction does: both name old store rows
    (old / "tables/image_scores.parquet").unlink()
    with pytest.raises(NotYetRun, match="run the score stage"):
        sacv.open_run(str(old)).top_images(*key, n=3)


def test_the_digest_leaves_out_checks_and_drift_of_an_older_audit(scored):
    run = RunDir(scored.run_dir)
    latest = run.read_audits().iloc[-1]
    assert pd.isna(latest["checks_failed"])  # this audit evaluated no checks
    run.write_table(
        "checks",
        pd.DataFrame([{"check": "c", "kind": "min", "row": "r", "value": 0.0, "threshold": 1.0, "passed": False}]),
    )
    drift = run.read_table("contributions").head(1)[["layer", "concept", "class_index", "class_name"]]
    drift = drift.reindex(columns=DRIFT_COLUMNS).assign(change=0.5, z=4.0, p_adjusted=0.001)
    run.write_table("drift", drift.assign(before="older", after="old-audit", significant=True))
    stale = audit_digest(scored.run_dir)
    assert stale.failed_checks == [] and stale.drift == [] and not stale.alert
    audits = run.read_audits()
    audits.loc[audits.index[-1], "checks_failed"] = 1  # now the checks are this audit's
    run.write_audits(audits)
    run.write_table("drift", drift.assign(before="older", after=latest["audit_id"], significant=True))
    current = audit_digest(scored.run_dir)
    assert len(current.failed_checks) == 1 and len(current.drift) == 1 and current.alert
