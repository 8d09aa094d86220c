"""Chunk writes of an extraction: overflow and finiteness checks of a region, a failing write
(no marker), a shard's arrays written side by side with its marker after all of them, and the codec
of a chunk too large for blosc."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tests.flow_helpers import make_config, write_collection


def test_float16_overflow_is_an_error_naming_the_fix():
    from sacv.io.zarr_store import write_region

    array = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 2), chunks=(2, 2), dtype="float16")
    with pytest.raises(ValueError, match="overflow float16.*extract.dtype: float32"):
        write_region(array, 0, np.array([[1.0, 7e4], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="not aligned to chunks of 2 rows"):
        write_region(array, 1, np.ones((2, 2)))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", ">f4", "int16"])
def test_the_exponent_bit_finiteness_check_equals_numpys(dtype):
    """``all_finite`` (the store writes' overflow check) against ``np.isfinite(...).all()`` on arrays
    with the largest finite values, subnormals and signed zeros, with and without one planted inf,
    -inf or NaN, contiguous and strided."""
    from sacv.io.zarr_store import all_finite

    rng = np.random.default_rng(7)
    kind = np.dtype(dtype)
    for case in range(60):
        with np.errstate(over="ignore", invalid="ignore"):  # large scales overflow float16: more infs
            values = (rng.standard_normal((6, 5, 4)) * 10.0 ** rng.integers(-8, 8)).astype(kind)
        if kind.kind == "f":
            info = np.finfo(kind)
            values.flat[:4] = [info.max, -info.max, info.smallest_subnormal, -0.0]
            if case % 4:
                values.flat[rng.integers(4, values.size)] = [np.inf, -np.inf, np.nan][case % 3]
        for view in (values, values[:, ::2], values.transpose(2, 0, 1)):
            assert all_finite(view) == bool(np.isfinite(view).all()), (dtype, case)
    assert not all_finite(np.array([1.0, np.nan], np.float16)) and all_finite(np.zeros(0, np.float16))


def test_a_failing_store_write_fails_the_shard_with_the_chunk_key_and_leaves_no_marker(tmp_path, monkeypatch):
    """The task bodies without Prefect: a write that fails (e.g. a full disk) names the array and
    rows, and the shard gets no marker, so a rerun redoes it."""
    import sacv.extract.extraction as extraction
    import sacv.extract.extraction_plan as planning
    import sacv.extract.shard_writes as shard_writes
    from sacv.io.rundir import RunDir

    write_collection(tmp_path, n_per_concept=2, n_per_class=3)
    config = make_config(tmp_path, with_concepts=False)
    plan = planning.plan_extraction(config.run_dir, config)
    original = shard_writes.write_region

    def full_disk(array, start, data):
        if array.path.endswith("features.2/act"):
            raise OSError(28, "No space left on device")
        return original(array, start, data)

    monkeypatch.setattr(shard_writes, "write_region", full_disk)
    shards = [shard for group, shard in plan.todo if group == "dataset"]
    with pytest.raises(
        RuntimeError, match=r"writing dataset/features\.2/act rows 0:4 \(shard dataset/0\) failed: .*No space"
    ):
        extraction.run_shards(config.run_dir, config, "dataset", shards)
    run = RunDir(config.run_dir)
    assert run.read_shard_marker("dataset", 0) is None
    monkeypatch.undo()
    extraction.run_shards(config.run_dir, config, "dataset", shards)  # the rerun completes
    assert all(run.read_shard_marker("dataset", s) is not None for s in shards)


def test_a_shards_arrays_are_written_side_by_side_and_its_marker_after_all_of_them(tmp_path, monkeypatch):
    """Each array region of a shard is its own write job; with the smallest array planted slow, the
    other regions are written in other threads meanwhile, and the marker still comes after every
    region of its shard (each region written once)."""
    import threading
    import time

    import sacv.extract.extraction as extraction
    import sacv.extract.extraction_plan as planning
    import sacv.extract.shard_writes as shard_writes
    from sacv.io.rundir import RunDir

    write_collection(tmp_path, n_per_concept=2, n_per_class=3)
    config = make_config(tmp_path, with_concepts=False)
    plan = planning.plan_extraction(config.run_dir, config)
    events: list[tuple[str, int, float, str]] = []  # (what, start row or shard, time, thread)
    original_write, original_marker = shard_writes.write_region, RunDir.write_shard_marker

    def recorded_write(array, start, data):
        if array.path.endswith("targets"):
            time.sleep(0.3)
        original_write(array, start, data)
        events.append((array.path, start, time.perf_counter(), threading.current_thread().name))

    def recorded_marker(self, group, shard, marker):
        original_marker(self, group, shard, marker)
        events.append(("marker", marker["rows"][0], time.perf_counter(), threading.current_thread().name))

    monkeypatch.setattr(shard_writes, "write_region", recorded_write)
    monkeypatch.setattr(RunDir, "write_shard_marker", recorded_marker)
    shards = [shard for group, shard in plan.todo if group == "dataset"]
    markers = extraction.run_shards(config.run_dir, config, "dataset", shards)
    n_arrays = 2 * len(config.layers) + 2
    for marker in markers:
        start = marker["rows"][0]
        regions = [e for e in events if e[0] != "marker" and e[1] == start]
        (written,) = [e[2] for e in events if e[0] == "marker" and e[1] == start]
        assert len(regions) == len({e[0] for e in regions}) == n_arrays
        assert all(t <= written for _, _, t, _ in regions)
        assert len({name for *_, name in regions}) > 1  # not one thread's serial writes
        slow = next(t for path, _, t, _ in regions if path.endswith("targets"))
        assert sum(t < slow - 0.2 for path, _, t, _ in regions if path.endswith("/act")) >= 1


def test_a_chunk_too_large_for_blosc_is_compressed_with_zstd(tmp_path, monkeypatch):
    import numcodecs.blosc
    from zarr.codecs import BloscCodec, ZstdCodec

    from sacv.io import zarr_store

    assert zarr_store.LARGE_CHUNK_BYTES == numcodecs.blosc.MAX_BUFFERSIZE  # blosc's own limit
    monkeypatch.setattr(zarr_store, "LARGE_CHUNK_BYTES", 1000)  # planted: chunks of 80 and 1 600 bytes
    root = zarr.open_group(str(tmp_path / "store.zarr"), mode="w", zarr_format=3)
    small = zarr_store.ensure_array(root, "small", (8, 10), 4, "float16")
    large = zarr_store.ensure_array(root, "large", (8, 200), 4, "float16")
    assert isinstance(small.compressors[0], BloscCodec) and isinstance(large.compressors[0], ZstdCodec)
    values = np.random.default_rng(0).standard_normal((4, 200)).astype(np.float16)
    zarr_store.write_region(large, 4, values)
    assert np.array_equal(zarr.open_group(str(tmp_path / "store.zarr"))["large"][4:], values)


def test_a_task_opens_each_array_once_however_many_shards_it_writes(tmp_path, monkeypatch):
    """Opening an array reads its metadata (a request on object storage), so a block of shards
    opens each array it writes once, not once per chunk; the regions still land (a rerun of the
    block finds every shard done)."""
    from collections import Counter

    import sacv.extract.extraction as extraction
    import sacv.extract.extraction_plan as planning
    from sacv.extract.catalog import ImageCatalog
    from sacv.io.rundir import RunDir

    write_collection(tmp_path, n_per_concept=6, n_per_class=5)
    config = make_config(tmp_path)
    plan = planning.plan_extraction(config.run_dir, config)
    opened: Counter = Counter()
    original = zarr.Group.__getitem__

    def counted(self, path):
        opened[path] += 1
        return original(self, path)

    monkeypatch.setattr(zarr.Group, "__getitem__", counted)
    for group in ("dataset", "guidance"):
        shards = [shard for g, shard in plan.todo if g == group]
        assert len(shards) >= 3, (group, shards)
        opened.clear()
        markers = extraction.run_shards(config.run_dir, config, group, shards)
        assert len(markers) == len(shards)
        written = {path for path in opened if path.startswith(f"{group}/")}
        assert len(written) >= 2 * len(config.layers)  # activations (and gradients or statistics) of each layer
        assert {opened[path] for path in written} == {1}, opened
    run = RunDir(config.run_dir)
    catalog = ImageCatalog.read(run)
    assert all(planning.shard_is_done(run, catalog, g, s, config) for g, s in plan.todo)
