"""The pipeline on an external Dask cluster: ``dask scheduler`` and two ``dask worker --nthreads 1``
processes started from the command line on loopback; tables equal to a thread-pool run, also when
a worker is SIGKILLed in the middle of extraction, and with one worker per (fake) GPU."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from flows.pipeline import run_pipeline
from sacv.config import parse_config
from sacv.io.rundir import RunDir
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

    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MALLOC_ARENA_MAX": "1",
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        **extra,
    }


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
    keys = {job["key"] for job in RunDir(config.run_dir).read_fit_plan()}  # identical jobs share one fit
    assert summary.extract.shards_run == 6 and summary.fit.fitted == len(keys) and summary.fit.vectors == 36
    assert_same_tables(run_tables(RunDir(config.run_dir), str(collection)), expected)
    workers_used = {p.read_text().count("Starting Worker") for p in tmp_path.glob("worker*.log")}
    assert workers_used == {1}  # both command-line workers joined (and none restarted)


@pytest.mark.parametrize("stage", ["extract", "fit"])
def test_a_worker_killed_mid_stage_costs_only_its_tasks(reference, tmp_path, stage):
    """SIGKILL a worker (and its nanny) while it holds a task of the stage (running or assigned),
    once a shard is done (extract) or the fit plan is written (fit): Dask reruns the lost tasks on
    the other worker and the run completes with the thread-pool tables; every shard has a marker."""
    collection, expected = reference
    cluster = start_dask(2, tmp_path, worker_env(SACV_TEST_DELAY="0.15"))
    config = dask_config(collection, f"killed-in-{stage}", cluster.address)
    run = RunDir(config.run_dir)
    lost: list[str] = []
    victim: list[int] = []  # index of the worker killed
    task = {"extract": "extract_shards", "fit": "fit_block"}[stage]  # the Dask key starts with the function name

    def markers() -> list[dict | None]:
        return [run.read_shard_marker(g, s) for g, n in (("guidance", 4), ("dataset", 2)) for s in range(n)]

    def started() -> bool:
        if stage == "extract":
            return any(marker is not None for marker in markers())
        return run.read_fit_plan() is not None

    def kill_when_busy():
        """Once the stage has started, SIGKILL the worker that holds a task of the stage (the task is
        lost). With few tasks (the fit has one block here) it may be either worker."""
        from distributed import Client

        with Client(cluster.address) as client:
            names = {address: w["name"] for address, w in client.scheduler_info()["workers"].items()}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                busy = client.processing() if started() else {}
                holder = next((address for address, keys in busy.items() if any(task in str(k) for k in keys)), None)
                if holder is not None:
                    lost.extend(busy[holder])
                    victim.append(int(str(names[holder]).removeprefix("w")))
                    os.killpg(cluster.workers[victim[0]].pid, signal.SIGKILL)
                    return
                time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    try:
        summary = run_pipeline(config)
    finally:
        killer.join(5)
        cluster.stop()
    assert any(task in str(key) for key in lost) and cluster.workers[victim[0]].poll() is not None  # died mid-task
    assert summary.extract.shards_run == 6 and all(m is not None for m in markers())
    assert_same_tables(run_tables(run, str(collection)), expected)


def test_one_worker_per_gpu_gives_the_one_process_tables(tmp_path, prefect):
    """docs/deploy.md's one worker per GPU, on the CPU: each worker started with its own
    ``CUDA_VISIBLE_DEVICES`` (fake values, ``execution.device: cpu``), a model whose CPU numbers
    depend on torch's thread count (``tests.models:pointwise``), one shard per task. Each worker
    loads the model once, seeing its own value; both extract shards; the tables are those of a
    one-process run, value for value (every process computes with the flow process's thread count)."""
    collection = write_collection(tmp_path / "collection")
    gpus = ("0", "1")

    def config(run: str, **execution):
        raw = pipeline_raw(str(collection), str(collection / run), spec="tests.models:pointwise")
        extract = raw["extract"] | {"shards_per_task": 1}
        return parse_config(raw | {"extract": extract, "execution": {"device": "cpu", **execution}})

    local = config("local")
    run_pipeline(local)
    loads = tmp_path / "loads"
    loads.mkdir()
    env = worker_env(SACV_TEST_LOADS=str(loads), SACV_TEST_DELAY="0.1")
    cluster = start_dask(2, tmp_path, env, per_worker=[{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus])
    try:
        gpu_run = config("gpus", dask_address=cluster.address)
        summary = run_pipeline(gpu_run)
    finally:
        cluster.stop()
    assert summary.extract.shards_run == 6
    assert sorted(p.read_text() for p in loads.iterdir()) == [f"{gpu}\n" for gpu in gpus]  # per process: one load
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    shards = [set(re.findall(r"'extract-shards-\w+' - shard (\w+/\d+):", log)) for log in logs]
    assert all(shards) and len(shards[0] | shards[1]) == 6, shards  # spread over both workers
    markers = [
        json.loads(p.read_text()) for p in Path(gpu_run.run_dir).glob("shards/*/*.json") if ".rejects" not in p.name
    ]
    processes = {marker["process"] for marker in markers}  # each marker names the worker that extracted it
    assert len(markers) == 6 and len(processes) == 2 and f"{socket.gethostname()}:{os.getpid()}" not in processes
    expected = run_tables(RunDir(local.run_dir), str(collection))
    assert_same_tables(run_tables(RunDir(gpu_run.run_dir), str(collection)), expected)
