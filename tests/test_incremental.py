"""Append-only store rows: a nightly increment extracts only the shards that gain rows; removed
images are marked, keep their rows and leave every later table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

import sacv.extract.catalog
import sacv.extract.image_sources
from flows.extract import run_extract
from flows.pipeline import run_pipeline
from sacv.config import parse_config
from sacv.extract.catalog import assign_rows
from sacv.io.rundir import RunDir
from tests.flow_helpers import pipeline_config, write_collection

N, SHARD = 300, 16


def write_tiny(folder: Path, start: int, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def dataset_config(root: Path):
    return parse_config(
        {
            "run_dir": str(root / "run"),
            "model": {"spec": "tests.models:small"},
            "layers": ["features.2"],
            "dataset": {"root": str(root / "data"), "target": "label"},
            "extract": {"shard_size": SHARD, "batch_size": 32},
        }
    )


def test_increment_extracts_only_the_shards_that_gain_rows(tmp_path, prefect, monkeypatch):
    write_tiny(tmp_path / "data" / "cat", 0, N // 2, seed=0)
    write_tiny(tmp_path / "data" / "dog", 0, N // 2, seed=1)
    config = dataset_config(tmp_path)
    first = run_extract(config)
    assert (first.images, first.shards_run, first.images_extracted, first.added) == (N, -(-N // SHARD), N, N)
    run = tmp_path / "run"
    before = pd.read_parquet(run / "tables/images.parquet").set_index("image_id")
    store = zarr.open_group(str(run / "store.zarr"), mode="r")
    acts = store["dataset/features.2/act"][...]

    new = write_tiny(tmp_path / "data" / "cat", N, 5, seed=2)  # sorts between the known cat images
    second = run_extract(config)
    # rows 300..304: the partly filled shard 18 (rows 288..299) gains 4, a new shard 19 holds 1
    assert second.added == 5 and second.removed == 0 and second.images == N + 5
    assert second.shards_run == 2 and second.images_extracted == SHARD + 1
    after = pd.read_parquet(run / "tables/images.parquet").set_index("image_id")
    pd.testing.assert_series_equal(after.loc[before.index, "row"], before["row"])
    assert sorted(after.drop(before.index)["row"]) == list(range(N, N + 5))
    untouched = (N // SHARD) * SHARD
    np.testing.assert_array_equal(
        zarr.open_group(str(run / "store.zarr"), mode="r")["dataset/features.2/act"][:untouched], acts[:untouched]
    )

    # nothing new: no shard runs and no file is read again (known stamps keep their ids)
    reads = []
    original = sacv.extract.catalog.read_bytes
    monkeypatch.setattr(sacv.extract.catalog, "read_bytes", lambda *a, **k: reads.append(a) or original(*a, **k))
    third = run_extract(config)
    assert third.shards_run == 0 and third.added == 0 and reads == []

    # removals: marked with the audit that removed them, rows kept, no shard redone
    gone = [tmp_path / "data" / "dog" / "img_00000.png", new[0]]
    ids = [after.index[after["path"] == str(p)][0] for p in gone]
    for path in gone:
        path.unlink()
    fourth = run_extract(config)
    assert fourth.removed == 2 and fourth.images == N + 3 and fourth.shards_run == 0
    table = pd.read_parquet(run / "tables/images.parquet").set_index("image_id")
    assert set(table.index[table["status"] == "removed"]) == set(ids)
    assert table.loc[ids, "removed_in"].nunique() == 1 and table.loc[ids, "removed_in"].notna().all()
    pd.testing.assert_series_equal(table.loc[after.index, "row"], after["row"])


def test_assign_rows_keeps_rows_marks_removals_and_never_reuses_a_row():
    def found(ids, labels):
        return pd.DataFrame(
            {
                "image_id": ids,
                "path": [f"/d/{i}.png" for i in ids],
                "group": "dataset",
                "role": "dataset",
                "concept": None,
                "label": labels,
                "mask": None,
                "stamp": None,
            }
        )

    first = assign_rows(found(["b", "d", "a"], [0, 0, 1]), None, 2, "A1")
    assert dict(zip(first["image_id"], first["row"])) == {"b": 0, "d": 1, "a": 2}  # first scan: (label, id) order
    second = assign_rows(found(["a", "c", "d", "d"], [1, 0, 0, 0]), first, 2, "A2")
    ok = second[second["status"] == "ok"].set_index("image_id")
    assert ok["row"].to_dict() == {"d": 1, "a": 2, "c": 3} and ok.loc["c", "shard"] == 1
    assert ok.loc["a", "added_in"] == "A1" and ok.loc["c", "added_in"] == "A2"
    removed = second[second["status"] == "removed"].iloc[0]
    assert (removed["image_id"], removed["row"], removed["removed_in"]) == ("b", 0, "A2")
    assert (second["status"] == "duplicate").sum() == 1
    third = assign_rows(found(["a", "b", "c", "d"], [1, 0, 0, 0]), second, 2, "A3")  # "b" comes back: a new row
    assert third.loc[(third["image_id"] == "b") & (third["status"] == "ok"), "row"].item() == 4
    assert third.loc[third["status"] == "removed", "row"].tolist() == [0]


def test_shard_lookups_equal_a_plain_filter_and_the_shared_catalog_is_reread_after_a_write(tmp_path, monkeypatch):
    """Over a table of several increments (removed, rejected and duplicate rows, two groups), every
    (group, shard) lookup equals filtering the table the obvious way; ``ImageCatalog.shared`` reads
    the table once for many lookups and again after it is written (in this process or another)."""
    from sacv.extract.catalog import ImageCatalog
    from sacv.io.rundir import RunDir

    def found(ids, group, labels):
        return pd.DataFrame(
            {
                "image_id": ids,
                "path": [f"/{group}/{i}.png" for i in ids],
                "group": group,
                "role": group,
                "concept": None,
                "label": labels,
                "mask": None,
                "stamp": None,
            }
        )

    rng = np.random.default_rng(0)
    tables = []
    for group in ("dataset", "guidance"):
        table = None
        for audit in range(3):
            ids = [f"{group[0]}{i:03d}" for i in sorted(rng.choice(200, 120, replace=False))]
            ids += ids[:5]  # duplicates
            table = assign_rows(found(ids, group, rng.integers(0, 3, len(ids)).tolist()), table, 7, f"A{audit}")
        table.loc[table.index[table["status"] == "ok"][:4], "status"] = "rejected"
        tables.append(table)
    frame = pd.concat(tables, ignore_index=True)
    catalog = ImageCatalog(frame)
    for group in ("dataset", "guidance"):
        for shard in range(int(frame["shard"].max()) + 2):
            of_shard = (frame["group"] == group) & (frame["shard"] == shard)
            for statuses, lookup in ((("ok",), catalog.rows), (sacv.extract.catalog.STORED, catalog.stored_rows)):
                expected = frame[of_shard & frame["status"].isin(statuses)].sort_values("row")
                got = lookup(group, shard)
                assert got["image_id"].tolist() == expected["image_id"].tolist(), (group, shard, statuses)
                assert got["row"].tolist() == expected["row"].tolist()

    run = RunDir(str(tmp_path / "run"))
    run.write_table("images", frame)
    reads = []
    original = RunDir.read_table
    monkeypatch.setattr(RunDir, "read_table", lambda self, name: reads.append(name) or original(self, name))
    first = ImageCatalog.shared(RunDir(run.uri))
    assert all(ImageCatalog.shared(RunDir(run.uri)) is first for _ in range(5)) and reads == ["images"]
    changed = frame.assign(status=frame["status"].replace({"rejected": "ok"}))  # same shape, same size on disk
    run.write_table("images", changed)
    again = ImageCatalog.shared(RunDir(run.uri))
    assert again is not first and len(again.rows("dataset", 0)) > len(first.rows("dataset", 0))
    changed.to_parquet(tmp_path / "run/tables/images.parquet", index=False)  # written by another process
    os.utime(tmp_path / "run/tables/images.parquet", ns=(1, 1))
    assert ImageCatalog.shared(RunDir(run.uri)) is not again and reads == ["images"] * 3


@pytest.fixture(scope="module")
def audited(tmp_path_factory, prefect):
    root = write_collection(tmp_path_factory.mktemp("audited"), n_per_concept=5, n_per_class=5)
    config = pipeline_config(root)
    first = run_pipeline(config)
    victim = sorted((root / "data" / "zebra").glob("*.jpg"))[0]
    images = pd.read_parquet(Path(config.run_dir) / "tables/images.parquet")
    victim_id = images.loc[images["path"] == str(victim), "image_id"].item()
    before = pd.read_parquet(Path(config.run_dir) / "tables/contributions.parquet")
    victim.unlink()
    second = run_pipeline(config)
    return root, config, first, second, victim_id, before


def test_removed_image_leaves_image_scores_and_contributions(audited):
    _, config, first, second, victim_id, before = audited
    run = Path(config.run_dir)
    assert second.extract.removed == 1 and second.extract.shards_run == 0
    assert second.score.shards_scored == 1  # only the shard that lost the image
    scores = RunDir(str(run)).read_table("image_scores")
    assert victim_id not in set(scores["image_id"]) and scores["image_id"].nunique() == first.extract.images - 15 - 1
    after = pd.read_parquet(run / "tables/contributions.parquet")
    zebra = 2  # the class index of the zebra folder (tests.models:small)
    assert (after.loc[after["class_index"] == zebra, "n_images"] == 4).all()
    assert (before.loc[before["class_index"] == zebra, "n_images"] == 5).all()


def test_class_names_are_matched_once_per_folder_and_per_distinct_manifest_label(tmp_path, monkeypatch):
    """Listing a million files must not match each file's class name against every class again
    (it did, per file): labels equal a per-file match, with one match per folder / distinct label;
    an empty folder with any name needs no class; a misnamed folder with files is an error."""
    from sacv.config import DatasetConfig

    names = ["cat", "zebra", "horse", "dog"]
    write_tiny(tmp_path / "data" / "Zebra", 0, 5, 0)
    write_tiny(tmp_path / "data" / "cat", 5, 3, 1)
    (tmp_path / "data" / "not a class").mkdir()
    rows = pd.DataFrame(
        {"path": [f"data/Zebra/img_{i:05d}.png" for i in range(5)], "label": ["zebra", "Dog", "zebra", "dog", 2]}
    )
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    calls = []
    original = sacv.extract.image_sources.match_class
    monkeypatch.setattr(
        sacv.extract.image_sources, "match_class", lambda name, classes: calls.append(name) or original(name, classes)
    )

    folders = sacv.extract.image_sources.dataset_candidates(DatasetConfig(root=str(tmp_path / "data")), names)
    assert sorted((Path(c.path).parent.name, c.label) for c in folders) == [("Zebra", 1)] * 5 + [("cat", 0)] * 3
    assert sorted(calls) == ["Zebra", "cat"]
    calls.clear()
    manifest = sacv.extract.image_sources.dataset_candidates(
        DatasetConfig(manifest=str(tmp_path / "manifest.csv")), names
    )
    assert [c.label for c in manifest] == [original(str(label), names) for label in rows["label"]] == [1, 3, 1, 3, 2]
    assert sorted(calls) == ["Dog", "dog", "zebra"]
    write_tiny(tmp_path / "data" / "not a class", 0, 1, 2)
    with pytest.raises(ValueError, match="'not a class' matches no class"):
        sacv.extract.image_sources.dataset_candidates(DatasetConfig(root=str(tmp_path / "data")), names)
