"""Start-up of the commands that run flows: Prefect's temporary API started in a background thread
and joined before the first flow run (flows.process), the imports without garbage collections
(sacv.cli), a run path that imports no torchvision, and what each flow call reuses (its flow with
the task runner, Prefect's settings with heartbeats off: flows.runners)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.process as process
from flows.runners import call_flow

REPO = Path(__file__).resolve().parents[1]


class FakeServer:
    """Stands in for ``SubprocessASGIServer()``: ``start`` waits until released, then fails or not."""

    made: list[FakeServer] = []

    def __init__(self, error: BaseException | None = None):
        self.error, self.started, self.thread = error, False, None
        self.release = threading.Event()
        FakeServer.made.append(self)

    def start(self) -> None:
        self.thread = threading.current_thread()
        self.release.wait(10)
        time.sleep(0.05)
        if self.error is not None:
            raise self.error
        self.started = True


@pytest.fixture
def fake_server(monkeypatch):
    """Patch the server class; no start pending before or after; no API URL configured."""
    import prefect.server.api.server

    def use(error: BaseException | None = None):
        monkeypatch.setattr(prefect.server.api.server, "SubprocessASGIServer", lambda: FakeServer(error))

    FakeServer.made = []
    monkeypatch.setattr(process, "_pending", None)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        yield use
    for server in FakeServer.made:
        server.release.set()


def test_the_start_runs_in_a_thread_and_wait_joins_it(fake_server):
    fake_server()
    assert process.start_temporary_api()
    (server,) = FakeServer.made
    assert not server.started  # the caller went on while the server started
    assert not process.start_temporary_api()  # one start at a time
    server.release.set()
    process.wait_for_temporary_api()
    assert server.started and server.thread is not threading.current_thread()
    assert not server.thread.is_alive()
    process.wait_for_temporary_api()  # nothing pending: returns at once
    assert len(FakeServer.made) == 1


def test_call_flow_raises_the_start_error_before_the_flow_runs(fake_server):
    fake_server(RuntimeError("no free port"))
    assert process.start_temporary_api()
    FakeServer.made[0].release.set()
    with pytest.raises(RuntimeError, match="no free port"):  # any later step fails otherwise (no config, no flow)
        call_flow(SimpleNamespace(), SimpleNamespace())
    process.wait_for_temporary_api()  # raised once; nothing pending after


def test_a_configured_api_url_starts_no_temporary_server(fake_server):
    fake_server()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert not process.start_temporary_api()
    assert FakeServer.made == [] and process._pending is None


def test_start_up_imports_run_without_collections_and_are_frozen(monkeypatch):
    from sacv import cli

    started = []
    monkeypatch.setattr(process, "start_temporary_api", lambda: started.append(1))

    class Node:
        pass

    frozen_before = gc.get_freeze_count()
    try:
        with cli._flow_start_up():
            assert started == [1] and not gc.isenabled()
            garbage = Node()
            garbage.self = garbage  # a cycle: only a collection frees it
            dead = weakref.ref(garbage)
            del garbage
            kept = [Node() for _ in range(100)]
        assert gc.isenabled()
        assert dead() is None  # collected before the freeze, not frozen
        assert gc.get_freeze_count() >= frozen_before + len(kept)
        with pytest.raises(ValueError), cli._flow_start_up():
            raise ValueError
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_the_run_path_imports_no_torchvision():
    code = (
        "import sys\n"
        "import sacv.cli, flows.pipeline, flows.demo\n"
        "from sacv.method.models import imagenet_class_names\n"
        "assert len(imagenet_class_names()) == 1000\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == ""


@pytest.mark.slow
def test_prefect_uses_the_server_started_early(tmp_path):
    """A real temporary API: started by start_temporary_api, found running by the first flow run
    (one start logged, the same subprocess), stopped at exit."""
    code = (
        "from prefect import flow\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "from flows.process import start_temporary_api, wait_for_temporary_api\n"
        "assert start_temporary_api()\n"
        "server = SubprocessASGIServer()\n"
        "@flow\n"
        "def one():\n"
        "    return 1\n"
        "wait_for_temporary_api()\n"
        "launched = server.server_process\n"
        "assert one() == 1\n"
        "print('same', SubprocessASGIServer() is server and server.server_process is launched"
        " and launched.poll() is None, launched.pid)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("same ")]
    _, same, pid = line.split()
    assert same == "True"
    assert result.stderr.count("Starting temporary server") == 1
    assert "Stopping temporary server" in result.stderr
    assert not Path(f"/proc/{pid}").exists()  # stopped at exit


def test_a_flow_gets_its_task_runner_once_per_setting():
    from flows.extract import extract_flow
    from flows.runners import with_task_runner
    from sacv.config import ExecutionConfig

    one, two = ExecutionConfig(workers=1), ExecutionConfig(workers=2)
    configured = with_task_runner(extract_flow, one)
    assert with_task_runner(extract_flow, ExecutionConfig(workers=1)) is configured  # built once
    assert configured.task_runner._max_workers == 1 and configured.fn is extract_flow.fn
    assert with_task_runner(extract_flow, two).task_runner._max_workers == 2


def test_heartbeats_are_off_in_a_copy_of_the_current_settings():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings

    from flows.runners import heartbeats_off

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        with heartbeats_off():
            first = get_current_settings()
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
        with heartbeats_off():
            assert get_current_settings() is first  # made once for these settings
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 30  # restored on exit
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with heartbeats_off():  # other settings: a copy of these, not the one made before
            assert PREFECT_API_URL.value() == "http://127.0.0.1:9/api"
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
