"""`sacv compact`: removed rows dropped, tables after compaction + a rerun equal a fresh run's."""

from __future__ import annotations

import os
import shutil
import socket

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from flows.pipeline import run_pipeline
from sacv.cli import main
from sacv.extract import compaction
from sacv.io import runlock
from sacv.io.rundir import RunDir
from tests.flow_helpers import assert_same_tables, pipeline_config, run_tables, store_arrays, write_collection


@pytest.fixture(scope="module")
def removed(tmp_path_factory, prefect):
    """An audit of 10 concept and 12 dataset images, then one without 2 dataset images (rows 1
    and 6 of 12: shards 0 and 1 of 3) and one concept image: a store with removed rows."""
    root = write_collection(tmp_path_factory.mktemp("compact"), n_per_concept=5, n_per_class=6)
    # Exact equality with a fresh run needs numbers that do not depend on what else was computed
    # alongside, whatever the store looks like: one image per batch (a batch of other images changes
    # the last bit of float16 activations) and a per-job solver (the batched L-BFGS shares a centre and
    # products among the jobs of a block, so vectors refitted in the second audit differ from a fresh
    # fit in the last digits). A cap on positions that keeps them all runs each job on its own.
    config = pipeline_config(root, store_maps=True)  # maps/ are per-image arrays too
    config = config.model_copy(update={"fit": config.fit.model_copy(update={"max_positions_per_class": 10**6})})
    # No separate pool: a concept's random sets and pseudo-concepts come from the 9-10 images of the
    # other concepts. 2 random sets of 2 leave 5-6 images outside them, enough for (distinct)
    # pseudo-concepts of 3 that share no image with a random set (so every side keeps its images).
    concepts = config.concepts.model_copy(update={"random_sets": 2, "images_per_set": 2, "images_per_concept": 3})
    config = config.model_copy(
        update={"concepts": concepts, "extract": config.extract.model_copy(update={"batch_size": 1})}
    )
    run_pipeline(config)
    images = RunDir(config.run_dir).read_table("images").set_index("row")
    dataset = images[images["group"] == "dataset"]
    for path in [
        dataset.loc[1, "path"],
        dataset.loc[6, "path"],
        sorted((root / "concepts" / "dotted").glob("*.png"))[0],
    ]:
        (root / "gone").mkdir(exist_ok=True)
        shutil.move(str(path), root / "gone")
    run_pipeline(config)
    assert (RunDir(config.run_dir).read_table("images")["status"] == "removed").sum() == 3
    return root, config


@pytest.fixture(scope="module")
def fresh(removed):
    """A fresh run directory over the same (remaining) images."""
    root, config = removed
    fresh = config.model_copy(update={"run_dir": str(root / "fresh")})
    run_pipeline(fresh)
    return fresh


def copy_run(config, tmp_path):
    shutil.copytree(config.run_dir, tmp_path / "run")
    return config.model_copy(update={"run_dir": str(tmp_path / "run")})


def test_compaction_then_a_rerun_gives_the_tables_and_store_of_a_fresh_run(removed, fresh, tmp_path):
    root, config = removed
    config = copy_run(config, tmp_path)
    run = RunDir(config.run_dir)
    before, old_arrays = run.read_table("images"), store_arrays(tmp_path / "run")
    result = CliRunner().invoke(main, ["compact", config.run_dir])
    assert result.exit_code == 0, result.output
    for path, values in store_arrays(tmp_path / "run").items():  # each image's row moved, bytes unchanged
        if path.startswith("vectors/"):
            np.testing.assert_array_equal(values, old_arrays[path], err_msg=path)
            continue
        group = "guidance" if path.startswith("guidance/") else "dataset"  # dataset/ and maps/
        live = before.loc[(before["group"] == group) & before["status"].isin(["ok", "rejected"]), "row"]
        np.testing.assert_array_equal(values, old_arrays[path][np.sort(live.to_numpy(np.int64))], err_msg=path)
    record = run.read_run_record()["compaction"]
    assert record["rows_before"] == {"dataset": 12, "guidance": 15} and record["rows_after"] == {
        "dataset": 10,
        "guidance": 14,
    }
    gone = int(before.loc[(before["group"] == "guidance") & (before["status"] == "removed"), "row"].iloc[0])
    assert record["shards_rewritten"] == {"dataset": 3, "guidance": 4 - gone // 4} and record["removed"] == 3
    assert record["bytes_after"] < record["bytes_before"]
    assert "dataset: 12 -> 10 rows, 3 shards rewritten" in result.output

    images = run.read_table("images")
    assert not (images["status"] == "removed").any() and len(images) == len(before) - 3
    kept = before[before["status"] != "removed"]
    for group, n in (("dataset", 10), ("guidance", 14)):  # contiguous rows, in the old order
        rows = images[(images["group"] == group) & (images["status"] == "ok")]
        assert rows["row"].tolist() == list(range(n))
        assert (
            rows["image_id"].tolist() == kept[(kept["group"] == group) & (kept["status"] == "ok")]["image_id"].tolist()
        )
    assert run.marked_shards("dataset") == [0, 1, 2] and run.marked_shards("guidance") == [0, 1, 2, 3]
    # the per-image statistics moved with their rows, so the rewritten shards still vouch for them
    assert all(run.read_shard_marker("guidance", s).get("pos_stats") for s in run.marked_shards("guidance"))
    assert {run.read_shard_marker("dataset", s)["process"] for s in run.marked_shards("dataset")} == {
        f"{socket.gethostname()}:{os.getpid()}"
    }  # the rewritten markers name the compacting process
    assert run.scored_shards() == []  # every dataset shard moved: scored again by the next run

    rerun = run_pipeline(config)
    assert rerun.extract.shards_run == 0 and rerun.fit.fitted == 0  # markers rewritten; fits keyed by content
    assert rerun.score.shards_scored == 3  # the dataset shards whose rows moved
    assert_same_tables(run_tables(run, str(root)), run_tables(RunDir(fresh.run_dir), str(root)))
    mine, theirs = store_arrays(tmp_path / "run"), store_arrays(root / "fresh")
    assert set(mine) == set(theirs)
    for path, values in theirs.items():
        np.testing.assert_array_equal(mine[path], values, err_msg=path)
    assert run.store_bytes() < RunDir(str(root / "run")).store_bytes()

    (root / "data" / "cat" / "late.jpg").write_bytes((root / "gone").glob("*.jpg").__next__().read_bytes())
    try:
        later = run_pipeline(config)  # still incremental: one new image, its shard only
    finally:
        (root / "data" / "cat" / "late.jpg").unlink()
    assert later.extract.added == 1 and later.extract.shards_run == 1 and later.extract.images_extracted == 3


def test_an_interrupted_compaction_is_repaired_by_the_next_run(removed, fresh, tmp_path, monkeypatch):
    root, config = removed
    config = copy_run(config, tmp_path)
    calls = []

    def fail_on_the_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return rewrite(*args)

    rewrite = compaction._rewrite_shard
    monkeypatch.setattr(compaction, "_rewrite_shard", fail_on_the_second)
    with pytest.raises(OSError):
        compaction.compact(config.run_dir)
    monkeypatch.undo()
    rerun = run_pipeline(config)
    assert rerun.extract.shards_run > 0  # the shards without a marker are extracted again
    assert_same_tables(run_tables(RunDir(config.run_dir), str(root)), run_tables(RunDir(fresh.run_dir), str(root)))
    assert compaction.compact(config.run_dir).shards_rewritten == {"dataset": 0, "guidance": 0}


def test_compaction_takes_the_run_lock_and_needs_a_run(removed, tmp_path):
    _, config = removed
    config = copy_run(config, tmp_path)
    run = RunDir(config.run_dir)
    with runlock.acquire(run):
        result = CliRunner().invoke(main, ["compact", config.run_dir])
    assert result.exit_code == 1 and "is held by another run" in result.output
    assert (run.read_table("images")["status"] == "removed").sum() == 3  # untouched
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["compact", str(empty)])
    assert result.exit_code == 1 and "run `sacv run` on it first" in result.output


def test_plan_rows_keeps_order_and_finds_the_first_changed_shard():
    images = pd.DataFrame(
        {
            "image_id": list("abcdefg"),
            "group": "dataset",
            "row": pd.array([0, 1, 2, 3, 4, 1, 5], dtype="Int64"),
            "status": ["ok", "ok", "removed", "rejected", "ok", "duplicate", "removed"],
            "path": list("abcdefg"),
        }
    )
    table, plans = compaction.plan_rows(images, shard_size=2)
    assert table["image_id"].tolist() == ["a", "b", "f", "d", "e"] and table["row"].tolist() == [0, 1, 1, 2, 3]
    assert table["shard"].tolist() == [0, 0, 0, 1, 1]
    plan = plans["dataset"]
    assert plan.old_rows.tolist() == [0, 1, 3, 4] and plan.rows_before == 6 and plan.first == 1
    tail = images[images["image_id"].isin(list("abcdefg")[:5])].assign(status=["ok", "ok", "ok", "ok", "removed"])
    assert compaction.plan_rows(tail, shard_size=2)[1]["dataset"].first == 2  # nothing moves, 4 rows: 2 whole shards
    tail = tail.assign(status=["ok", "ok", "ok", "removed", "removed"])
    assert compaction.plan_rows(tail, shard_size=2)[1]["dataset"].first == 1  # shard 1 loses a row
