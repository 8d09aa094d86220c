"""Images and run directory on a real S3-compatible server (moto on loopback, through s3fs): the
pipeline gives the local run's tables, a killed run resumes, and writes are whole objects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.pipeline import run_pipeline
from sacv.config import parse_config
from sacv.io import storage
from sacv.io.rundir import RunDir
from tests.flow_helpers import (
    assert_same_tables,
    pipeline_raw,
    run_tables,
    store_arrays,
    write_collection,
    write_manifest,
)
from tests.servers import upload

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def remote(tmp_path_factory, s3, prefect):
    """A collection on local disk and the same files in a bucket (plus a manifest of s3:// URLs), and
    the tables of an uninterrupted local run (class-folder dataset root)."""
    local = write_collection(tmp_path_factory.mktemp("collection"))
    bucket = s3.create_bucket("sacv-collection")
    write_manifest(local, f"{bucket}/collection")
    upload(s3.filesystem(), local, f"{bucket}/collection")
    config = parse_config(pipeline_raw(str(local), str(local / "local-run")))
    run_pipeline(config)
    return local, bucket, run_tables(RunDir(config.run_dir), str(local))


def s3_raw(bucket: str, run: str, s3) -> dict:
    """Concept folders on S3 (a folder root) and the dataset as a manifest of s3:// URLs; run_dir on S3."""
    dataset = {"manifest": f"{bucket}/collection/manifest.csv", "target": "label"}
    raw = pipeline_raw(f"{bucket}/collection", f"{bucket}/{run}", dataset=dataset)
    return raw | {"storage_options": {f"{bucket}/": s3.options}}


def test_pipeline_on_s3_gives_the_local_tables(remote, s3):
    local, bucket, expected = remote
    config = parse_config(s3_raw(bucket, "run", s3))
    summary = run_pipeline(config)
    assert summary.extract.images == 15 + 8 and summary.fit.fitted > 0

    run = RunDir(config.run_dir)
    assert not run.is_local and run.storage_options == s3.options
    assert_same_tables(run_tables(run, f"{bucket}/collection"), expected)
    store = run.open_zarr("r")
    for key, values in store_arrays(local / "local-run").items():
        np.testing.assert_array_equal(store[key][...], values, err_msg=key)
    # nothing but whole objects under RUN/ (no temporary names), and no credentials in run.json
    keys = s3.filesystem().find(config.run_dir.removeprefix("s3://"))
    assert keys and not [k for k in keys if ".tmp-" in k]
    assert run.read_run_record()["config"]["storage_options"] == {f"{bucket}/": s3.options}
    assert run_pipeline(config).extract.shards_run == 0  # markers read back from S3: nothing redone


def test_secrets_in_storage_options_are_redacted_in_run_json(remote, s3):
    _, bucket, _ = remote
    options = {**s3.options, "key": "testing", "secret": "testing"}
    raw = s3_raw(bucket, "redacted", s3) | {"storage_options": {f"{bucket}/": options}}
    raw["concepts"] = None  # extraction alone is enough to write run.json
    config = parse_config(raw)
    run_pipeline(config)
    recorded = RunDir(config.run_dir).read_run_record()["config"]["storage_options"][f"{bucket}/"]
    assert recorded == {**s3.options, "key": "***", "secret": "***"}
    assert "testing" not in json.dumps(RunDir(config.run_dir).read_run_record())


def test_options_go_to_the_longest_matching_prefix():
    mapping = {"s3://a/": {"anon": True}, "s3://a/private/": {"anon": False}, "gs://b": {"project": "p"}}
    assert storage.options_for("s3://a/x.png", mapping) == {"anon": True}
    assert storage.options_for("s3://a/private/x.png", mapping) == {"anon": False}
    assert storage.options_for("s3://ab/x.png", mapping) == {}
    assert storage.options_for("gs://b/x.png", mapping) == {"project": "p"}
    assert storage.options_for("gs://bc/x.png", mapping) == {}  # a prefix ends at a "/"
    assert storage.options_for("/data/s3://a/x.png", mapping) == {}  # a local path: never options
    with pytest.raises(ValueError, match="URL prefixes"):
        parse_config({"run_dir": "r", "layers": ["x"], "storage_options": {"/data": {}}})


@pytest.mark.slow
def test_killed_run_on_s3_resumes_with_the_same_tables(remote, s3, tmp_path):
    """SIGKILL ``sacv run`` in the middle of extraction on S3, then rerun: the local tables, and
    the shards finished before the kill are not extracted again (their markers are unchanged)."""
    _, bucket, expected = remote
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(s3_raw(bucket, "killed", s3)))
    run = RunDir(f"{bucket}/killed", s3.options)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"), "SACV_TEST_DELAY": "0.2"}
    command = [sys.executable, "-m", "sacv.cli", "run", str(config_path)]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(_markers(run)) < 2:
        time.sleep(0.2)
    assert process.poll() is None, f"the run ended before it was killed:\n{process.communicate()[0].decode()[-3000:]}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
    before = _markers(run)
    assert 2 <= len(before) < 6, "the run must be killed in the middle of extraction"

    rerun = subprocess.run(
        command, cwd=REPO, env={**env, "SACV_TEST_DELAY": "0"}, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    after = _markers(run)
    assert {shard: after[shard] for shard in before} == before  # done shards were not redone
    assert_same_tables(run_tables(run, f"{bucket}/collection"), expected)


def _markers(run: RunDir) -> dict[tuple[str, int], float]:
    """Extraction markers on the run directory: (group, shard) -> finished_at."""
    out = {}
    for group, shards in (("guidance", 4), ("dataset", 2)):
        for shard in range(shards):
            marker = run.read_shard_marker(group, shard)
            if marker is not None:
                out[(group, shard)] = marker["finished_at"]
    return out
