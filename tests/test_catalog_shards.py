"""``images.parquet`` read in part: a per-shard task's catalog (``ImageCatalog.for_shards``) answers
as the whole table does, from a few of its row groups, on local disk and on S3."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sacv.extract.catalog import IMAGES_ROW_GROUP, ImageCatalog, assign_rows, write_images
from sacv.io.rundir import RunDir

N, SHARD = 200_000, 64
GUIDANCE = 20_000  # the rest: dataset images


def found(ids: np.ndarray, group: str) -> pd.DataFrame:
    """Scanned images (``assign_rows`` input) with content ids ``ids``."""
    ids = [f"{i:016x}" for i in ids]
    return pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"/collection/{group}/{i}.jpg" for i in ids],
            "group": group,
            "role": "dataset" if group == "dataset" else "concept",
            "concept": None if group == "dataset" else "striped",
            "label": pd.array([int(i, 16) % 10 for i in ids], dtype="Int64") if group == "dataset" else None,
            "mask": None,
            "stamp": "1:1",
        }
    )


def synthetic_catalog() -> pd.DataFrame:
    """Two audits of N images in two groups: the second removes 1% of the images, adds 2,000 new ones
    and 300 duplicates (another path, same bytes), then 200 images are quarantined (``rejected``);
    dataset shard 100 gets a removed, a duplicate and a quarantined image for sure."""
    rng = np.random.default_rng(0)
    tables = []
    for group, n, offset in (("dataset", N - GUIDANCE, 0), ("guidance", GUIDANCE, 10**9)):
        first = assign_rows(found(offset + np.arange(n), group), None, SHARD, "A1")
        keep = np.ones(n, dtype=bool)
        keep[rng.choice(n, n // 100, replace=False)] = False
        copied = rng.choice(np.flatnonzero(keep), 300, replace=False)
        if group == "dataset":
            spoiled = first.loc[first["shard"] == 100, "image_id"].map(lambda i: int(i, 16)).to_numpy()
            keep[spoiled[:3]], keep[spoiled[3]] = False, True
            copied = np.r_[copied, spoiled[3]]
        scanned = found(offset + np.r_[np.flatnonzero(keep), n + np.arange(2_000)], group)
        copies = found(offset + copied, group).assign(path=lambda f: f["path"].str.replace(".jpg", "-copy.jpg"))
        second = assign_rows(pd.concat([scanned, copies], ignore_index=True), first, SHARD, "A2")
        ok = second["status"] == "ok"
        second.loc[rng.choice(second.index[ok], 100, replace=False), "status"] = "rejected"
        if group == "dataset":
            second.loc[second.index[ok & (second["shard"] == 100)][4:6], "status"] = "rejected"
        tables.append(second)
    return pd.concat(tables[::-1], ignore_index=True)  # guidance first: the writer sorts


@pytest.fixture(scope="module")
def catalog_run(tmp_path_factory) -> RunDir:
    run = RunDir(str(tmp_path_factory.mktemp("catalog") / "run"))
    write_images(run, synthetic_catalog())
    return run


def count_row_groups(monkeypatch) -> list[int]:
    """The row groups read through ``pq.ParquetFile.read_row_groups`` from now on."""
    read, original = [], pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, groups, **kw: read.extend(groups) or original(self, groups, **kw),
    )
    return read


def assert_same_shards(run: RunDir, whole: ImageCatalog, group: str, shards: list[int], monkeypatch) -> list[int]:
    """``for_shards`` of ``shards`` answers ``rows``/``stored_rows`` as ``whole`` does (frames
    equal: values, dtypes, index); returns the row groups it read."""
    read = count_row_groups(monkeypatch)
    part = ImageCatalog.for_shards(run, group, shards)
    for shard in shards:
        pd.testing.assert_frame_equal(part.rows(group, shard), whole.rows(group, shard))
        pd.testing.assert_frame_equal(part.stored_rows(group, shard), whole.stored_rows(group, shard))
    monkeypatch.undo()
    return read


def test_the_writer_sorts_into_bounded_row_groups_with_statistics(catalog_run):
    """Sorted by (group, row), row groups of at most IMAGES_ROW_GROUP rows of one group, statistics
    of group, row and shard only."""
    meta = pq.ParquetFile(f"{catalog_run.root}/tables/images.parquet").metadata
    frame = catalog_run.read_table("images")
    sizes = frame.groupby("group").size()
    assert meta.num_rows == len(frame) > N and meta.num_row_groups == sum(-(-sizes // IMAGES_ROW_GROUP))
    assert frame.equals(frame.sort_values(["group", "row"], kind="stable"))
    groups = [meta.row_group(i).column(frame.columns.get_loc("group")).statistics for i in range(meta.num_row_groups)]
    assert all(stats.min == stats.max for stats in groups)  # no row group holds two groups
    columns = [meta.row_group(0).column(j) for j in range(meta.num_columns)]
    assert {c.path_in_schema for c in columns if c.statistics and c.statistics.has_min_max} == {"group", "row", "shard"}


def test_a_shard_task_reads_its_rows_from_one_or_two_row_groups(catalog_run, monkeypatch):
    whole = ImageCatalog.read(catalog_run)
    frame = whole.frame
    statuses = set(frame.loc[(frame["group"] == "dataset") & (frame["shard"] == 100), "status"])
    assert statuses == {"ok", "removed", "duplicate", "rejected"}  # the shard the fixture spoils
    total = pq.ParquetFile(f"{catalog_run.root}/tables/images.parquet").metadata.num_row_groups
    for group in ("dataset", "guidance"):
        last = int(frame.loc[frame["group"] == group, "shard"].max())
        for shards in ([0], [last // 2], [last], [100], list(range(250, 258)), [last + 1]):
            read = assert_same_shards(catalog_run, whole, group, shards, monkeypatch)
            assert len(read) <= (1 if shards[0] in (0, 100) else 2) < total, (group, shards, read)
    assert len(whole.rows("dataset", 100)) < len(whole.stored_rows("dataset", 100))  # the frames compared differ


def test_a_group_catalog_answers_the_group_lookups_and_refuses_others(catalog_run, monkeypatch):
    whole = ImageCatalog.read(catalog_run)
    read = count_row_groups(monkeypatch)
    guidance = ImageCatalog.for_shards(catalog_run, "guidance")
    assert len(read) <= 2
    ids = whole.rows("guidance")["image_id"].sample(500, random_state=0)
    assert (guidance.row_of(ids, "guidance") == whole.row_of(ids, "guidance")).all()
    assert guidance.shards("guidance") == whole.shards("guidance")
    pd.testing.assert_frame_equal(guidance.rows("guidance"), whole.rows("guidance"))
    for lookup in (lambda: guidance.rows("dataset", 0), guidance.current, lambda: guidance.shards("dataset")):
        with pytest.raises(ValueError, match="ImageCatalog.for_shards"):
            lookup()
    part = ImageCatalog.for_shards(catalog_run, "dataset", [3])
    with pytest.raises(ValueError, match=r"dataset shards \[3\]"):
        part.stored_rows("dataset", 4)
    with pytest.raises(ValueError):
        part.rows("dataset")


def test_a_table_written_before_row_groups_is_read_whole_with_the_same_answers(tmp_path, catalog_run, monkeypatch):
    """A table of an older store (one row group, not sorted): the same answers, from every row group."""
    run = RunDir(str(tmp_path / "old"))
    whole_frame = catalog_run.read_table("images").sample(frac=1, random_state=0).reset_index(drop=True)
    run.write_table("images", whole_frame)
    whole = ImageCatalog.read(run)
    last = int(whole_frame.loc[whole_frame["group"] == "dataset", "shard"].max())
    assert assert_same_shards(run, whole, "dataset", [0, 100, last], monkeypatch) == [0]


def test_on_s3_only_the_footer_and_the_shard_row_groups_are_fetched(catalog_run, s3, monkeypatch):
    import s3fs

    bucket = s3.create_bucket("sacv-catalog")
    run = RunDir(f"{bucket}/run", storage_options=s3.options)
    write_images(run, catalog_run.read_table("images"))
    size = run.fs.info(f"{run.root}/tables/images.parquet")["size"]
    whole = ImageCatalog.read(run)
    fetched, original = [], s3fs.core.S3File._fetch_range
    monkeypatch.setattr(
        s3fs.core.S3File,
        "_fetch_range",
        lambda self, start, end: fetched.append(end - start) or original(self, start, end),
    )
    part = ImageCatalog.for_shards(run, "dataset", [100])
    monkeypatch.undo()
    pd.testing.assert_frame_equal(part.stored_rows("dataset", 100), whole.stored_rows("dataset", 100))
    assert 0 < sum(fetched) < size / 4 and len(fetched) <= 3, (fetched, size)  # footer, one row group
