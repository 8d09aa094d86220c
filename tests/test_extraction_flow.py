"""The extraction flow: store round trip, resume after a kill, bad inputs, Dask runner, identity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image

from flows.extract import run_extract
from sacv.io.images import load_image
from sacv.io.zarr_store import StoreMismatch
from sacv.method.activations import extract
from sacv.method.models import load_model
from tests.flow_helpers import make_config, store_arrays, write_collection

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("collection"))


def test_store_round_trip_equals_in_memory_extraction(collection, prefect):
    config = make_config(collection, run="roundtrip")
    summary = run_extract(config)
    assert summary.status == "done" and summary.images == 15 + 8

    run = Path(config.run_dir)
    images = pd.read_parquet(run / "tables/images.parquet")
    store = zarr.open_group(str(run / "store.zarr"), mode="r")
    model = load_model("tests.models:small")
    for group in ("guidance", "dataset"):
        rows = images[(images["group"] == group) & (images["status"] == "ok")].sort_values("row")
        batch = torch.stack([model.preprocessing(load_image(p)[1]) for p in rows["path"]])
        target = torch.tensor(rows["label"].astype("int64").to_numpy()) if group == "dataset" else None
        expected = extract(model.module, batch, config.layers, target, with_gradients=group == "dataset")
        for layer in config.layers:
            stored = store[f"{group}/{layer}/act"][...]
            assert stored.dtype == np.float16 and stored.shape == tuple(expected.activations[layer].shape)
            np.testing.assert_allclose(stored, expected.activations[layer].numpy(), rtol=2e-3, atol=2e-3)
            if group == "dataset":
                grad = store[f"dataset/{layer}/grad"][...].astype(np.float32)
                np.testing.assert_allclose(grad, expected.gradients[layer].numpy(), rtol=2e-3, atol=1e-5)
        if group == "dataset":
            np.testing.assert_allclose(store["dataset/logits"][...], expected.logits.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(store["dataset/targets"][...], rows["label"].to_numpy())
    # images of class folders got the model's class indices; concepts their folder names
    assert set(images.loc[images["group"] == "dataset", "label"]) == {0, 2}
    assert set(images.loc[images["group"] == "guidance", "concept"]) == {"striped", "dotted", "chequered"}


def test_rerun_skips_done_shards_and_renamed_files_are_not_reprocessed(collection, prefect, tmp_path):
    config = make_config(collection, run="rerun")
    first = run_extract(config)
    assert first.shards_run == sum(first.shards.values())
    assert run_extract(config).shards_run == 0
    victim = next((collection / "concepts" / "dotted").glob("*.png"))
    renamed = victim.with_name("renamed_" + victim.name)
    victim.rename(renamed)
    try:
        assert run_extract(config).shards_run == 0
    finally:
        renamed.rename(victim)


def test_same_image_under_two_names_is_stored_once(tmp_path, prefect):
    root = write_collection(tmp_path, n_per_concept=3, n_per_class=2)
    original = next((root / "concepts" / "striped").glob("*.png"))
    (root / "concepts" / "striped" / "copy.png").write_bytes(original.read_bytes())
    config = make_config(root)
    run_extract(config)
    images = pd.read_parquet(Path(config.run_dir) / "tables/images.parquet")
    copies = images[images["path"].str.endswith(("copy.png", original.name))]
    assert len(copies) == 2 and copies["row"].nunique() == 1
    assert sorted(copies["status"]) == ["duplicate", "ok"]
    assert zarr.open_group(str(Path(config.run_dir) / "store.zarr"))["guidance/features.0/act"].shape[0] == 9


def _cli(config_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sacv.cli", "extract", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_killed_run_resumes_without_redoing_finished_shards(collection, tmp_path, prefect):
    config = make_config(collection, run="killed", spec="tests.models:small_slow")
    config_path = tmp_path / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"), "SACV_TEST_DELAY": "0.4"}
    markers = Path(config.run_dir) / "shards"
    process = _cli(config_path, env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(markers.glob("*/*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in markers.glob("*/*.json")}
    total = 4 + 2  # shards: guidance 15 images / 4, dataset 8 images / 4 (see write_collection)
    assert 2 <= len(finished) < total, "the run must be killed between shards"

    rerun = subprocess.run(
        [sys.executable, "-m", "sacv.cli", "extract", str(config_path)],
        cwd=REPO,
        env={**env, "SACV_TEST_DELAY": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{total - len(finished)} shards run" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished shards were not redone

    os.environ["SACV_TEST_DELAY"] = "0"
    try:
        reference = make_config(collection, run="uninterrupted", spec="tests.models:small_slow")
        run_extract(reference)
    finally:
        del os.environ["SACV_TEST_DELAY"]
    resumed, clean = store_arrays(Path(config.run_dir)), store_arrays(Path(reference.run_dir))
    assert (
        resumed.keys() == clean.keys() and len(resumed) == 8 + 6
    )  # + pos_sum, pos_sqsum, pos_count of 2 guidance layers
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key], err_msg=key)


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Good and bad files; returns the expected reject reason (substring) per bad file name."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "good.jpg", quality=95)
    full = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not a png")
    Image.new("CMYK", (40, 40), (0, 128, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, size=(40, 40))).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rng.integers(0, 255, size=(40, 40, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "tiny.png")
    Image.new("RGB", (120, 120), (200, 10, 10)).save(folder / "huge.png")
    (folder / "notes.txt").write_text("not an image file type")
    (folder / "logo.svg").write_text("<svg/>")
    return {
        "truncated.jpg": "truncated",
        "empty.jpg": "zero-byte",
        "text.png": "not an image",
        "tiny.png": "too small",
        "huge.png": "too large",
        "notes.txt": "unsupported file type '.txt'",
        "logo.svg": "unsupported file type '.svg'",
    }


def test_bad_inputs_are_rejected_with_reasons_and_the_rest_is_stored(tmp_path, prefect):
    expected = write_bad_inputs(tmp_path / "data" / "cat")
    config = make_config(tmp_path, with_concepts=False, max_pixels=10_000)
    summary = run_extract(config)
    assert summary.status == "done with rejects" and summary.rejects == len(expected)
    rejects = pd.read_parquet(Path(config.run_dir) / "tables/rejects.parquet")
    reasons = {Path(p).name: r for p, r in zip(rejects["path"], rejects["reason"])}
    assert reasons.keys() == expected.keys()
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    stages = dict(zip(rejects["path"].map(lambda p: Path(p).name), rejects["stage"]))
    assert stages["notes.txt"] == stages["logo.svg"] == "list" and stages["empty.jpg"] == "read"
    assert stages["truncated.jpg"] == "decode"  # found by the shard that decoded it: pixels decoded once
    images = pd.read_parquet(Path(config.run_dir) / "tables/images.parquet")
    ok = images[images["status"] == "ok"]
    assert sorted(Path(p).name for p in ok["path"]) == ["alpha.png", "cmyk.jpg", "deep16.png", "good.jpg"]
    quarantined = images[images["status"] == "rejected"]
    assert list(quarantined["path"].map(lambda p: Path(p).name)) == ["truncated.jpg"]  # keeps its row, filled with 0
    store = zarr.open_group(str(Path(config.run_dir) / "store.zarr"))
    acts = store["dataset/features.0/act"][...]
    assert acts.shape[0] == 5 and np.isfinite(acts).all()
    assert (np.abs(acts[ok["row"].to_numpy(int)]).reshape(4, -1).sum(1) > 0).all()
    bad_row = int(quarantined["row"].iloc[0])
    assert not acts[bad_row].any() and store["dataset/targets"][bad_row] == -1
    # a rerun neither tries the known reject again nor redoes a shard
    again = run_extract(config)
    assert again.shards_run == 0 and again.rejects == len(expected) and again.images == 4
    assert pd.read_parquet(Path(config.run_dir) / "tables/rejects.parquet").equals(rejects)


def test_a_file_that_changes_after_planning_is_a_reject_not_a_failed_shard(tmp_path, prefect, monkeypatch):
    folder = tmp_path / "data" / "cat"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    config = make_config(tmp_path, with_concepts=False)
    import sacv.extract.extraction_plan as planning

    planned = planning.plan_extraction

    def plan_then_change(run_uri, cfg, audit_id=None, batches=None):
        plan = planned(run_uri, cfg, audit_id, batches)
        Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(folder / "img1.png")
        return plan

    monkeypatch.setattr(planning, "plan_extraction", plan_then_change)
    summary = run_extract(config)
    rejects = pd.read_parquet(Path(config.run_dir) / "tables/rejects.parquet")
    assert summary.rejects == 1 and summary.images == 2
    assert Path(rejects["path"].iloc[0]).name == "img1.png" and "changed since planning" in rejects["reason"].iloc[0]
    monkeypatch.undo()
    rerun = run_extract(config)  # the changed file has a new content id: planned and extracted again
    assert rerun.images == 3 and rerun.rejects == 0


def test_cli_reports_done_with_rejects(tmp_path):
    write_bad_inputs(tmp_path / "data" / "cat")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\nmodel: {{spec: 'tests.models:small'}}\nlayers: [features.0]\n"
        f"dataset: {{root: {tmp_path / 'data'}}}\nextract: {{max_pixels: 10000}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    result = subprocess.run(
        [sys.executable, "-m", "sacv.cli", "extract", str(config), "--strict"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "extract done with rejects: 4 images, 7 rejected" in result.stdout  # 5 bad images, 2 other file types


def test_dask_runner_gives_the_same_store_as_the_thread_pool(collection, prefect):
    from distributed import LocalCluster

    threads = make_config(collection, run="threads")
    run_extract(threads)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = make_config(collection, run="dask").model_copy(
            update={"execution": threads.execution.model_copy(update={"dask_address": cluster.scheduler_address})}
        )
        summary = run_extract(dask)
    assert summary.shards_run == sum(summary.shards.values())
    a, b = store_arrays(Path(threads.run_dir)), store_arrays(Path(dask.run_dir))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_store_written_with_another_model_is_refused(collection, prefect):
    run_extract(make_config(collection, run="identity"))
    other = make_config(collection, run="identity", spec="tests.models:small_other")
    with pytest.raises(
        StoreMismatch, match="written with model_spec = 'tests.models:small'.*tests.models:small_other.*new run_dir"
    ):
        run_extract(other)


def test_changing_layers_or_target_redoes_the_shards(collection, prefect):
    config = make_config(collection, run="settings").model_copy(update={"layers": ["features.0"]})
    run_extract(config)
    wider = config.model_copy(update={"layers": ["features.0", "features.2"]})
    assert run_extract(wider).shards_run == 6
    acts = zarr.open_group(str(Path(config.run_dir) / "store.zarr"))["guidance/features.2/act"][...]
    assert (np.abs(acts).reshape(len(acts), -1).sum(1) > 0).all()  # the new layer was filled, not left at 0
    predicted = wider.model_copy(update={"dataset": wider.dataset.model_copy(update={"target": "predicted"})})
    assert run_extract(predicted).shards_run == 2  # only the dataset shards depend on the target


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_run_dir_may_be_an_fsspec_url(collection, prefect, scheme):
    local = make_config(collection, run="url_reference")
    run_extract(local)
    url = "memory://sacv-test/run" if scheme == "memory" else f"file://{collection}/url_run"
    remote = local.model_copy(update={"run_dir": url})
    assert run_extract(remote).shards_run == 6
    assert run_extract(remote).shards_run == 0  # markers are read back through fsspec too
    expected = store_arrays(Path(local.run_dir))
    store = zarr.open_group(f"{url}/store.zarr" if scheme == "memory" else f"{collection}/url_run/store.zarr", mode="r")
    for key, values in expected.items():
        np.testing.assert_array_equal(store[key][...], values, err_msg=key)


def test_planning_fans_out_over_batches_of_files_and_gives_the_tables_of_one_scan(tmp_path, prefect):
    """``extract.scan_batch: 4``: the files are listed once, checked by one task per batch of 4
    (each writing its own part), and the images and rejects tables equal those of one batch, rescanned in one call."""
    import sacv.extract.extraction_plan as planning
    from sacv.io.rundir import RunDir

    write_collection(tmp_path)
    write_bad_inputs(
        tmp_path / "data" / "dog"
    )  # 11 files: 5 usable, 5 rejected by the scan, 1 truncated (by its shard)
    batched = make_config(tmp_path, run="batched", scan_batch=4)
    summary = run_extract(batched)
    listed = len(RunDir(batched.run_dir).read_scan_part("candidates"))
    batches = -(-listed // 4)
    parts = sorted(p.name for p in (tmp_path / "batched" / "scan").glob("checked-*.parquet"))
    assert listed == 15 + 8 + 11 and parts == [f"checked-{k:05d}.parquet" for k in range(batches)]

    single = make_config(tmp_path, run="single")
    run_extract(single)  # one check batch
    planning.plan_extraction(single.run_dir, single)  # and a rescan in one call, without the flow's tasks
    for table in ("images", "rejects"):
        a = RunDir(batched.run_dir).read_table(table).drop(columns=["added_in"], errors="ignore")
        b = RunDir(single.run_dir).read_table(table).drop(columns=["added_in"], errors="ignore")
        pd.testing.assert_frame_equal(a, b)
    assert summary.images == 23 + 5 and summary.rejects == 6


@pytest.mark.parametrize("workers", [1, 2])
def test_with_one_worker_the_shard_tasks_run_in_the_flows_own_thread(tmp_path, prefect, monkeypatch, workers):
    """The model runs measurably slower in a task-runner thread, so with one worker (and no
    cluster) the extraction tasks run in the caller's thread; with more they fan out to the pool."""
    import threading

    import sacv.extract.extraction as extraction

    write_collection(tmp_path, n_per_concept=2, n_per_class=3)
    config = make_config(tmp_path, shards_per_task=1)
    config = config.model_copy(update={"execution": config.execution.model_copy(update={"workers": workers})})
    threads, original = [], extraction.run_shards

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(extraction, "run_shards", recording)
    assert run_extract(config).shards_run == len(threads) > 1
    in_caller = [thread is threading.current_thread() for thread in threads]
    assert all(in_caller) if workers == 1 else not any(in_caller)
