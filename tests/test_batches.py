"""Batches of an extraction never run past a shard's end, so a batch size larger than the shard size
is warned about (what the warning says is what happens)."""

from __future__ import annotations

import sacv.extract.extraction as extraction
import sacv.extract.extraction_plan as planning
from tests.flow_helpers import make_config, write_collection


def test_batches_stop_at_each_shards_end_and_a_larger_batch_size_is_warned_about(tmp_path, monkeypatch):
    write_collection(tmp_path, n_per_concept=2, n_per_class=5)
    sizes: list[int] = []
    original = extraction.extract

    def recorded(module, inputs, *args, **kwargs):
        sizes.append(len(inputs))
        return original(module, inputs, *args, **kwargs)

    monkeypatch.setattr(extraction, "extract", recorded)
    for batch_size, expected in ((3, [3, 1]), (8, [4])):  # shards of 4 images
        config = make_config(tmp_path, run=f"run-{batch_size}", with_concepts=False, batch_size=batch_size)
        plan = planning.plan_extraction(config.run_dir, config)
        shards = [shard for group, shard in plan.todo if group == "dataset"]
        sizes.clear()
        markers = extraction.run_shards(config.run_dir, config, "dataset", shards)
        assert markers[0]["images"] == markers[1]["images"] == 4  # two full shards first
        assert sizes[: 2 * len(expected)] == expected * 2  # the first two (full) shards, batch by batch
        assert max(sizes) == min(batch_size, 4)
        warnings = extraction.batch_warnings(config)
        if batch_size <= 4:
            assert warnings == []
        else:
            (warning,) = warnings
            assert "extract.batch_size is 8" in warning and "extract.shard_size is 4" in warning
            assert "at most 4 images" in warning and "multiple of batch_size" in warning
