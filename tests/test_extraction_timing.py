"""Where an extraction's time goes: each shard marker splits its time (decode wait, compute,
writes) and the flow's summary times its steps (scan, plan, shards, record)."""

from __future__ import annotations

import os
import socket
import time

import pytest

import sacv.extract.extraction as extraction
import sacv.extract.extraction_plan as planning
import sacv.extract.shard_writes as shard_writes
from flows.extract import run_extract
from tests.flow_helpers import make_config, write_collection


def test_each_marker_splits_the_shard_time_into_decode_wait_compute_and_write(tmp_path, monkeypatch):
    """A planted slow decode (0.05 s per image) shows up as decode wait and a planted slow write
    (0.2 s per array) as write time, each at least the planted delay; a shard's arrays are written
    side by side (one job each, 3 writer threads for 6 arrays: two rounds, not six); the parts fit in
    the shard's seconds."""
    write_collection(tmp_path, n_per_concept=2, n_per_class=3)
    config = make_config(tmp_path, with_concepts=False)
    config = config.model_copy(update={"execution": config.execution.model_copy(update={"write_workers": 3})})
    plan = planning.plan_extraction(config.run_dir, config)
    original_item, original_write = extraction.ShardImages.__getitem__, shard_writes.write_region

    def slow_item(self, index):
        time.sleep(0.05)
        return original_item(self, index)

    def slow_write(array, start, data):
        time.sleep(0.2)
        return original_write(array, start, data)

    monkeypatch.setattr(extraction.ShardImages, "__getitem__", slow_item)
    monkeypatch.setattr(shard_writes, "write_region", slow_write)
    shards = [shard for group, shard in plan.todo if group == "dataset"]
    markers = extraction.run_shards(config.run_dir, config, "dataset", shards)
    n_arrays = 2 * len(config.layers) + 2  # act + grad per layer, logits, targets
    for marker in markers:
        timing = marker["timing"]
        assert timing["decode_wait_s"] >= 0.05 * marker["images"] * 0.9
        assert 0.2 * 2 * 0.9 <= timing["write_s"] < 0.2 * n_arrays * 0.75
        assert timing["compute_s"] > 0 and timing["writer_wait_s"] >= 0
        assert timing["decode_wait_s"] + timing["compute_s"] + timing["write_s"] <= marker["seconds"] + 0.01
        assert marker["finished_at"] - marker["started_at"] == pytest.approx(marker["seconds"], abs=0.05)
        assert marker["process"] == f"{socket.gethostname()}:{os.getpid()}"  # extracted in this process


def test_the_summary_times_each_step_of_the_flow(tmp_path, prefect, monkeypatch):
    """Planted delays in the plan (0.3 s), in each shard task (0.2 s) and in merging the rejects
    (0.4 s) show up in their own phase; the phases fit in the flow's wall time."""

    def delayed(function, seconds):
        def run(*args, **kwargs):
            time.sleep(seconds)
            return function(*args, **kwargs)

        return run

    write_collection(tmp_path, n_per_concept=2, n_per_class=3)
    config = make_config(tmp_path, shards_per_task=1)
    monkeypatch.setattr(planning, "plan_extraction", delayed(planning.plan_extraction, 0.3))
    monkeypatch.setattr(extraction, "run_shards", delayed(extraction.run_shards, 0.2))
    monkeypatch.setattr(extraction, "record_shard_rejects", delayed(extraction.record_shard_rejects, 0.4))
    summary = run_extract(config)
    phases = summary.phases
    assert list(phases) == ["scan", "plan", "shards", "record"]
    assert phases["plan"] >= 0.3 and phases["shards"] >= 0.2 * summary.shards_run and phases["record"] >= 0.4
    assert phases["scan"] >= 0 and sum(phases.values()) <= summary.seconds
