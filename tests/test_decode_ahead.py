"""Decoding ahead across extraction tasks: a task told the next task's first shard decodes it while
its own last shard is written, the next task uses those images (each decoded once), a held shard that
does not match is dropped, and the store equals one extracted without decoding ahead."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

import sacv.extract.decode_pool as decode_pool
import sacv.extract.extraction as extraction
import sacv.extract.extraction_plan as planning
import sacv.extract.shard_writes as shard_writes
from flows.extract import run_extract, shard_blocks
from sacv.io.rundir import RunDir
from tests.flow_helpers import make_config, store_arrays, write_collection


def _with_loader(config, workers: int, loader: str = "auto"):
    execution = config.execution.model_copy(update={"loader_workers": workers, "loader": loader})
    return config.model_copy(update={"execution": execution})


@pytest.mark.parametrize(("workers", "loader"), [(0, "auto"), (2, "threads")])
def test_the_next_tasks_first_shard_is_decoded_while_this_tasks_last_shard_is_written(
    tmp_path, monkeypatch, workers, loader
):
    """Two blocks of one group, the writes planted slow (0.15 s per array): every image of the second
    block's first shard is decoded before the first block's last marker is written, and only once,
    although the second block runs after the first has returned; that shard then waits for no image."""
    write_collection(tmp_path, n_per_concept=2, n_per_class=6)
    config = _with_loader(make_config(tmp_path, with_concepts=False), workers, loader)
    plan = planning.plan_extraction(config.run_dir, config)
    shards = [shard for group, shard in plan.todo if group == "dataset"]
    assert len(shards) >= 3
    first, second = shards[:2], shards[2:]
    decoded: list[tuple[str, float]] = []  # (path, time)
    markers_at: dict[int, float] = {}
    original_item, original_write, original_marker = (
        decode_pool.ShardImages.__getitem__,
        shard_writes.write_region,
        RunDir.write_shard_marker,
    )

    def recorded_item(self, index):
        item = original_item(self, index)
        if self.rows["status"].iloc[index] == "ok":
            decoded.append((self.rows["path"].iloc[index], time.perf_counter()))
        return item

    def slow_write(array, start, data):
        time.sleep(0.15)
        original_write(array, start, data)

    def recorded_marker(self, group, shard, marker):
        original_marker(self, group, shard, marker)
        markers_at[shard] = time.perf_counter()

    monkeypatch.setattr(decode_pool.ShardImages, "__getitem__", recorded_item)
    monkeypatch.setattr(shard_writes, "write_region", slow_write)
    monkeypatch.setattr(RunDir, "write_shard_marker", recorded_marker)
    extraction.run_shards(config.run_dir, config, "dataset", first, ("dataset", second[0]))
    returned = time.perf_counter()
    later = extraction.run_shards(config.run_dir, config, "dataset", second)

    images = RunDir(config.run_dir).read_table("images")
    ahead = images[(images["group"] == "dataset") & (images["shard"] == second[0]) & (images["status"] == "ok")]
    times = [at for path, at in decoded if path in set(ahead["path"])]
    assert len(times) == len(ahead) > 0  # each decoded once, by the first task
    assert max(times) < markers_at[first[-1]] < returned
    assert later[0]["timing"]["decode_wait_s"] < 0.05
    assert sorted(path for path, _ in decoded) == sorted(images.loc[images["status"] == "ok", "path"])


def test_a_held_shard_that_does_not_match_is_dropped_and_only_one_is_held(tmp_path):
    """The shard decoded ahead is used only by a call whose first shard has the same files (content
    ids) and settings; any other call decodes its own and drops it, so at most one is held."""
    write_collection(tmp_path, n_per_concept=2, n_per_class=6)
    config = make_config(tmp_path, with_concepts=False)
    plan = planning.plan_extraction(config.run_dir, config)
    rows = RunDir(config.run_dir).read_table("images")
    preprocessing = extraction.cached_model("tests.models:small", None, "cpu").preprocessing

    def shard(index: int, **change) -> decode_pool.ShardImages:
        frame = rows[(rows["group"] == "dataset") & (rows["shard"] == index)].sort_values("row").assign(**change)
        return decode_pool.ShardImages(frame, preprocessing, config)

    a, b, c = (shard(s) for _, s in plan.todo[:3])
    list(map(list, decode_pool.decoded_shards([a], 0, then=b)))
    assert list(decode_pool._AHEAD) == [b.key()]
    changed = shard(plan.todo[1][1], image_id="0" * 16)  # b's files with other content ids
    anew = [type(item) for item in next(decode_pool.decoded_shards([changed], 0))]
    assert anew == [extraction.ImageRejected] * len(changed)  # decoded anew: "changed since planning"
    assert decode_pool._AHEAD == {}
    list(map(list, decode_pool.decoded_shards([a], 0, then=b)))
    list(map(list, decode_pool.decoded_shards([c], 0, then=a)))
    assert list(decode_pool._AHEAD) == [a.key()]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_flow_with_decoding_ahead_stores_what_shards_extracted_alone_store(tmp_path, prefect, workers):
    """One shard per task (decoding ahead at every boundary, also from the guidance group to the
    dataset group; decode processes or the model's thread) against each block extracted with no
    shard decoded ahead: the same arrays and tables."""
    write_collection(tmp_path, n_per_concept=4, n_per_class=6)
    flow = _with_loader(make_config(tmp_path, run="flow", shards_per_task=1), workers)
    alone = _with_loader(make_config(tmp_path, run="alone", shards_per_task=1), workers)
    summary = run_extract(flow)
    assert summary.shards_run >= 4
    decode_pool._AHEAD.clear()
    plan = planning.plan_extraction(alone.run_dir, alone)
    for group, shards in shard_blocks(plan.todo, 1):
        extraction.run_shards(alone.run_dir, alone, group, shards)
        decode_pool._AHEAD.clear()
    extraction.record_shard_rejects(alone.run_dir)
    got, expected = store_arrays(tmp_path / "flow"), store_arrays(tmp_path / "alone")
    assert got.keys() == expected.keys()
    for path in expected:
        assert (got[path] == expected[path]).all(), path
    for table in ("images", "rejects"):
        a = RunDir(flow.run_dir).read_table(table).drop(columns=["added_in"], errors="ignore")
        b = RunDir(alone.run_dir).read_table(table).drop(columns=["added_in"], errors="ignore")
        pd.testing.assert_frame_equal(a, b)


def test_the_flow_tells_each_task_in_its_thread_the_next_blocks_first_shard(tmp_path, prefect, monkeypatch):
    """With one task worker each task but the last gets the next block's first shard; all tasks run in
    the caller's thread."""
    write_collection(tmp_path, n_per_concept=2, n_per_class=6)
    config = make_config(tmp_path, shards_per_task=2)
    calls, original = [], extraction.run_shards

    def recording(run_uri, config, group, shards, then=None):
        calls.append((group, list(shards), then, threading.current_thread()))
        return original(run_uri, config, group, shards, then)

    monkeypatch.setattr(extraction, "run_shards", recording)
    run_extract(config)
    assert len(calls) >= 3
    assert [then for _, _, then, _ in calls] == [(g, s[0]) for g, s, _, _ in calls[1:]] + [None]
    assert all(thread is threading.current_thread() for *_, thread in calls)
