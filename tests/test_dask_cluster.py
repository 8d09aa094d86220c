"""The pipeline on an external Dask cluster: ``dask scheduler`` and two ``dask worker --nthreads 1``
processes started from the command line on loopback; tables equal to a thread-pool run, also when
a worker is SIGKILLed in the middle of extraction."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flows.pipeline import run_pipeline
from sacv.config import parse_config
from sacv.rundir import RunDir
from tests.flow_helpers import assert_same_tables, pipeline_raw, run_tables, write_collection
from tests.servers import start_dask

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect):
    """A collection and the tables of its thread-pool run."""
    collection = write_collection(tmp_path_factory.mktemp("collection"))
    config = parse_config(pipeline_raw(str(collection), str(collection / "threads")))
    run_pipeline(config)
    return collection, run_tables(RunDir(config.run_dir), str(collection))


def worker_env(**extra: str) -> dict:
    """The environment docs/deploy.md prescribes for workers, with this session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "1", "PREFECT_API_URL": PREFECT_API_URL.value(),
            **extra}


def dask_config(collection: Path, run: str, address: str):
    raw = pipeline_raw(str(collection), str(collection / run))
    return parse_config(raw | {"execution": {"dask_address": address}})


def test_external_cluster_gives_the_thread_pool_tables(reference, tmp_path):
    collection, expected = reference
    cluster = start_dask(2, tmp_path, worker_env())
    try:
        config = dask_config(collection, "dask", cluster.address)
        summary = run_pipeline(config)
    finally:
        cluster.stop()
    assert summary.extract.shards_run == 6 and summary.fit.fitted == 12
    assert_same_tables(run_tables(RunDir(config.run_dir), str(collection)), expected)
    workers_used = {p.read_text().count("Starting Worker") for p in tmp_path.glob("worker*.log")}
    assert workers_used == {1}  # both command-line workers joined (and none restarted)


def test_a_worker_killed_during_extraction_costs_only_its_tasks(reference, tmp_path):
    """SIGKILL one worker (and its nanny) once the first shard is done: Dask reschedules the lost
    task on the other worker and the run completes with the thread-pool tables."""
    collection, expected = reference
    cluster = start_dask(2, tmp_path, worker_env(SACV_TEST_DELAY="0.3"))
    config = dask_config(collection, "killed-worker", cluster.address)
    run = RunDir(config.run_dir)
    killed = threading.Event()

    def kill_when_a_shard_is_done():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.read_shard_marker("guidance", 0) is None \
                and run.read_shard_marker("guidance", 1) is None:
            time.sleep(0.1)
        os.killpg(cluster.workers[0].pid, signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_when_a_shard_is_done, daemon=True)
    killer.start()
    try:
        summary = run_pipeline(config)
    finally:
        killer.join(5)
        cluster.stop()
    assert killed.is_set() and cluster.workers[0].poll() is not None
    markers = [run.read_shard_marker("guidance", s) for s in range(4)] + [run.read_shard_marker("dataset", s) for s in range(2)]
    assert summary.extract.shards_run == 6 and all(m is not None for m in markers)
    assert_same_tables(run_tables(run, str(collection)), expected)
