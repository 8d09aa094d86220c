"""One run at a time per run directory, on local disk and on a real S3 server (moto)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml
from click.testing import CliRunner

from sacv.cli import main
from sacv.io import runlock
from sacv.io.rundir import RunDir


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path):
    if request.param == "local":
        return RunDir(str(tmp_path / "run"))
    server = request.getfixturevalue("s3")
    bucket = f"lock-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    return RunDir(f"{server.create_bucket(bucket)}/run", server.options)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_run_stops_with_a_message_naming_the_lock_and_the_holder(run):
    with runlock.acquire(run) as held:
        with pytest.raises(runlock.RunLocked) as refused:
            runlock.acquire(run)
        message = str(refused.value)
        record = held.record
        assert run.lock_uri in message and f"pid {record['pid']}" in message
        assert f"host {record['host']}" in message and record["started"] in message
        assert run.read_lock()["token"] == record["token"]  # the refused run left the holder's lock alone
    assert run.read_lock() is None  # released
    runlock.acquire(run).release()  # and free again


def test_conditional_create_lets_exactly_one_of_many_racers_win(run):
    records = [{"token": f"racer-{i}"} for i in range(8)]
    won = []
    threads = [
        threading.Thread(target=lambda r=r: won.append(r["token"]) if run.create_lock(r) else None) for r in records
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and run.read_lock()["token"] == won[0]


def test_a_lock_whose_process_died_is_taken_over(run):
    run.write_lock(
        {"host": socket.gethostname(), "pid": _dead_pid(), "started": "then", "heartbeat": time.time(), "token": "dead"}
    )
    with runlock.acquire(run) as lock:
        assert run.read_lock()["token"] == lock.record["token"]


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(run):
    other = {"host": "elsewhere", "pid": 1, "started": "then", "token": "other"}
    run.write_lock(other | {"heartbeat": time.time()})
    with pytest.raises(runlock.RunLocked, match="host elsewhere"):
        runlock.acquire(run, ttl_s=60)
    run.write_lock(other | {"heartbeat": time.time() - 61})
    with runlock.acquire(run, ttl_s=60) as lock:
        assert run.read_lock()["token"] == lock.record["token"]


def test_a_waiting_run_gets_the_lock_when_the_holder_finishes(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    holder = runlock.acquire(run)
    threading.Timer(1.0, holder.release).start()
    started = time.monotonic()
    with runlock.acquire(run, wait_s=20, poll_s=0.2) as lock:
        assert 0.9 < time.monotonic() - started < 10 and run.read_lock()["token"] == lock.record["token"]


def test_heartbeat_keeps_a_long_run_fresh(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with runlock.acquire(run, ttl_s=1.0) as lock:  # a heartbeat every 0.25 s
        first = run.read_lock()["heartbeat"]
        time.sleep(1.2)  # longer than the ttl: only the heartbeat keeps the lock alive
        assert run.read_lock()["heartbeat"] > first
        assert runlock.stale_reason(run.read_lock(), ttl_s=1.0) is None
        assert lock.record["token"] == run.read_lock()["token"]


def test_sacv_run_on_a_locked_run_dir_stops_before_any_work(tmp_path):
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"spec": "tests.models:small"},
        "layers": ["features.2"],
        "dataset": {"root": str(tmp_path)},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with runlock.acquire(RunDir(config["run_dir"])) as held:
        result = CliRunner().invoke(main, ["run", str(tmp_path / "config.yaml")])
    assert result.exit_code == 1
    assert "lock.json is held by another run" in result.output and f"pid {held.record['pid']}" in result.output
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # nothing written, lock released


def test_exclusive_create_without_a_conditional_put_writes_then_reads_back(tmp_path):
    """A filesystem with no exclusive create: the first creation wins, the second sees the file and
    changes nothing."""
    from fsspec.implementations.memory import MemoryFileSystem

    from sacv.io.storage import create_whole

    class NoExclusiveCreate(MemoryFileSystem):
        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            if mode == "create":
                raise NotImplementedError
            return super().pipe_file(path, value, **kwargs)

    fs, path = NoExclusiveCreate(), f"/{tmp_path.name}/run/lock.json"
    assert create_whole(fs, path, b'{"token": "first"}')
    assert not create_whole(fs, path, b'{"token": "second"}')
    assert fs.cat_file(path) == b'{"token": "first"}'
