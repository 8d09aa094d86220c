"""Per-image statistics written at extraction (sacv.extract.position_stats) and the fit that uses them: equal to
numpy over the stored activations, the fallback for stores without them, the same vectors either way,
and a mean-difference fit that reads only held-out images. No Prefect."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from sacv.extract import extraction, extraction_plan
from sacv.extract.catalog import ImageCatalog
from sacv.extract.position_stats import MARKER_FLAG, STATS, ensure_stats_arrays, shard_stats
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import write_region
from sacv.method.vectors import grouped_validation_split
from tests.flow_helpers import pipeline_config, write_collection
from tests.test_fit_job import LAYER, C, planted_run
from tests.test_sweep import cosine, record_readers
from tests.test_sweep import fit_all as fit_planned

pytestmark = pytest.mark.filterwarnings("ignore::sacv.method.vectors.NearChanceWarning")  # pseudo-concepts: chance


def fit_all(run, config):
    """Every planned vector fitted (fit blocks in process); the vectors table."""
    return fit_planned(run, config)[1]


def clear_fits(run: RunDir) -> None:
    if run.fs.exists(run._path("fits")):
        run.fs.rm(run._path("fits"), recursive=True)


def add_stats(run: RunDir, shards: list[int] | None = None) -> None:
    """Give a planted store (chunks of 8 rows, no markers) what extraction writes: the statistics
    arrays, each listed shard's statistics (default: all) and a marker that records them."""
    root = zarr.open_group(run.store_uri, mode="a")
    act = root[f"guidance/{LAYER}/act"]
    n, step = act.shape[0], act.chunks[0]
    ensure_stats_arrays(root, "guidance", LAYER, n, C, step)
    for shard in range(-(-n // step)) if shards is None else shards:
        start = shard * step
        for name, values in shard_stats(act[start : start + step], act.dtype, []).items():
            write_region(root[f"guidance/{LAYER}/{name}"], start, values)
        run.write_shard_marker("guidance", shard, {"digest": "planted", MARKER_FLAG: True})


def test_shard_statistics_are_those_of_the_stored_float16_values():
    rng = np.random.default_rng(0)
    act = rng.normal(3.0, 2.0, size=(5, 6, 7, 4)).astype(np.float32)  # (n, H, W, C) as the model gives it
    stats = shard_stats(act, np.dtype("float16"), blank=[3])
    stored = act.astype(np.float16).astype(np.float64)
    expected_sum, expected_sq = stored.sum(axis=(1, 2)), (stored**2).sum(axis=(1, 2))
    expected_sum[3] = expected_sq[3] = 0.0
    np.testing.assert_allclose(stats["pos_sum"], expected_sum, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(stats["pos_sqsum"], expected_sq, rtol=1e-13, atol=1e-12)
    np.testing.assert_array_equal(stats["pos_count"], [42, 42, 42, 0, 42])
    assert stats["pos_sum"].dtype == np.float64 and stats["pos_count"].dtype == np.int64
    # of the stored values, not of the float32 ones: those differ by float16 rounding
    assert np.abs(stats["pos_sum"][0] - act[0].astype(np.float64).sum(axis=(0, 1))).max() > 1e-6


def test_extraction_writes_statistics_equal_to_numpy_over_the_stored_activations(tmp_path):
    write_collection(tmp_path, n_per_concept=3, n_per_class=2)
    config = pipeline_config(tmp_path)
    config = config.model_copy(update={"concepts": config.concepts.model_copy(update={"images_per_concept": 3})})
    plan = extraction_plan.plan_extraction(config.run_dir, config)
    guidance = [shard for group, shard in plan.todo if group == "guidance"]
    markers = extraction.run_shards(config.run_dir, config, "guidance", guidance)
    extraction.run_shards(config.run_dir, config, "dataset", [s for g, s in plan.todo if g == "dataset"])
    root = zarr.open_group(RunDir(config.run_dir).store_uri, mode="r")
    assert all(marker[MARKER_FLAG] for marker in markers)
    for layer in config.layers:
        act = root[f"guidance/{layer}/act"]
        assert act.dtype == np.float16
        stored = act[...].astype(np.float64)  # (N, H, W, C): the stored values, widened
        n, h, w, c = stored.shape
        for name in STATS:
            array = root[f"guidance/{layer}/{name}"]
            assert array.chunks[0] == act.chunks[0] == 4 and array.shape[0] == n  # shard-aligned, as act
        np.testing.assert_allclose(
            root[f"guidance/{layer}/pos_sum"][...], stored.sum(axis=(1, 2)), rtol=1e-12, atol=1e-9
        )
        np.testing.assert_allclose(
            root[f"guidance/{layer}/pos_sqsum"][...], (stored**2).sum(axis=(1, 2)), rtol=1e-12, atol=1e-9
        )
        np.testing.assert_array_equal(root[f"guidance/{layer}/pos_count"][...], np.full(n, h * w))
        assert f"dataset/{layer}/pos_sum" not in root  # the fit reads guidance images only


def test_a_store_without_statistics_gives_the_same_vectors_as_one_with_them(tmp_path):
    """A store extracted before the statistics existed: the arrays are deleted and the markers no
    longer record them. A new extraction plan creates the arrays but redoes no shard; the fit computes
    the statistics from the positions (one more pass) and gives the vectors of the full store."""
    write_collection(tmp_path, n_per_concept=5, n_per_class=2)
    config = pipeline_config(tmp_path)
    plan = extraction_plan.plan_extraction(config.run_dir, config)
    extraction.run_shards(config.run_dir, config, "guidance", [s for g, s in plan.todo if g == "guidance"])
    run = RunDir(config.run_dir)
    fit_all(run, config)
    table = run.read_table("vectors")
    coef = {layer: zarr.open_group(run.store_uri, mode="r")[f"vectors/{layer}/coef"][...] for layer in config.layers}
    results = [run.read_fit_result(row.layer, row.key) for row in table.itertuples()]
    assert {r["image_stats"] for r in results} == {"stored"}

    root = zarr.open_group(run.store_uri, mode="a")
    for layer in config.layers:
        for name in STATS:
            del root[f"guidance/{layer}/{name}"]
    for shard in range(plan.shards["guidance"]):
        marker = run.read_shard_marker("guidance", shard)
        run.write_shard_marker("guidance", shard, {k: v for k, v in marker.items() if k != MARKER_FLAG})
    again = extraction_plan.plan_extraction(config.run_dir, config)
    assert not [s for g, s in again.todo if g == "guidance"]  # nothing re-extracted
    assert f"guidance/{config.layers[0]}/pos_sum" in zarr.open_group(run.store_uri, mode="r")  # template made again
    clear_fits(run)
    old = fit_all(run, config)
    results_old = [run.read_fit_result(row.layer, row.key) for row in old.itertuples()]
    assert {r["image_stats"] for r in results_old} == {"computed"}
    assert (old["passes"] == table["passes"] + 1).all()  # the statistics pass
    for layer in config.layers:
        coef_old = zarr.open_group(run.store_uri, mode="r")[f"vectors/{layer}/coef"][...]
        for a, b in zip(coef[layer], coef_old):
            assert cosine(a, b) >= 0.9999
    np.testing.assert_allclose(old["bal_acc"], table["bal_acc"], atol=1e-9)


@pytest.mark.parametrize(
    "fit",
    [
        {"solver": "lbfgs"},
        {"solver": "mean_difference"},
        {"solver": "mean_difference", "whiten": True, "intercept": "logistic"},
    ],
)
def test_planted_vectors_from_stored_statistics_equal_those_from_the_positions(tmp_path, fit):
    """Before: statistics computed from the positions in the task (the previous code path, and the
    fallback). After: all shards' statistics stored; and half of them stored (mixed store)."""
    rng = np.random.default_rng(5)
    mixing = np.diag(np.exp(rng.normal(0, 0.7, C))) + 0.3 * rng.normal(size=(C, C))
    run, config, u = planted_run(tmp_path, shift=0.8, mixing=mixing, fit=fit)
    before = fit_all(run, config)
    coef = zarr.open_group(run.store_uri, mode="r")[f"vectors/{LAYER}/coef"][...]
    for shards in ([0, 2], None):
        add_stats(run, shards)
        clear_fits(run)
        after = fit_all(run, config)
        coef_after = zarr.open_group(run.store_uri, mode="r")[f"vectors/{LAYER}/coef"][...]
        for a, b in zip(coef, coef_after):
            assert cosine(a, b) >= 0.9999
        np.testing.assert_allclose(after["bal_acc"], before["bal_acc"], atol=1e-9)
        stats = {run.read_fit_result(LAYER, key)["image_stats"] for key in after["key"]}
        assert stats == ({"stored"} if shards is None else {"computed"})  # every group touches shard 1
    assert ((before["passes"] - after["passes"]) == 1).all()  # no statistics pass


def test_mean_difference_midpoint_reads_only_held_out_images_and_is_the_numpy_mean_difference(tmp_path, monkeypatch):
    run, config, u = planted_run(tmp_path, shift=2.0, fit={"solver": "mean_difference", "compare_logistic": False})
    add_stats(run)
    readers = record_readers(monkeypatch)
    table = fit_all(run, config)
    (reader,) = readers
    catalog = ImageCatalog.read(run)
    act = zarr.open_group(run.store_uri, mode="r")[f"guidance/{LAYER}/act"][...].astype(np.float64)
    coef = zarr.open_group(run.store_uri, mode="r")[f"vectors/{LAYER}/coef"][...]
    held_out = set()
    for job, row in zip(run.read_fit_plan(), table.itertuples()):
        pos, neg = catalog.row_of(job["pos"]), catalog.row_of(job["neg"])
        both = set(pos) & set(neg)  # an image on both sides counts as random
        label_of = dict.fromkeys(pos.tolist(), 1) | dict.fromkeys(neg.tolist(), 0)
        rows = np.array(sorted(label_of))
        y = np.array([label_of[r] for r in rows])
        val = grouped_validation_split(y, rows, config.fit.validation_fraction, config.fit.seed)
        held_out |= set(rows[val].tolist())
        train_pos, train_neg = rows[~val & (y == 1)], rows[~val & (y == 0)]
        assert not both & set(train_pos.tolist())
        expected = act[train_pos].reshape(-1, C).mean(axis=0) - act[train_neg].reshape(-1, C).mean(axis=0)
        np.testing.assert_allclose(coef[row.vector_row], expected, rtol=1e-5, atol=1e-6)
    assert sorted(reader.rows.tolist()) == sorted(held_out)  # only held-out images were read
    assert reader.chunk_reads == len(np.unique(reader.rows // 8))
    assert set(table["passes"]) == {1}  # the held-out scoring; no pass for the vector itself
    assert (table.loc[table["kind"] == "concept", "bal_acc"] > 0.7).all()  # Φ(shift / 2) = 0.84 per position
    json.dumps(run.read_fit_result(LAYER, table["key"].iloc[0]))  # results stay plain JSON
