"""End to end through a real Prefect server: deployments/prefect.yaml -> process worker -> tables.

Starts `prefect server start`, creates the `sacv-process` work pool, runs `prefect deploy --all`
from the repository root, starts a worker, triggers `sacv-audit/audit` on a tiny config and waits
for the flow run to complete: the tables, the report and the audit's artifacts under the run
directory's keys are there. Then it adds images and a policy check that fails, and triggers it
again: the second audit extracts only the new shard, each audit leaves one audits row and its
history, the flow run ends Failed with the failing check as its message, and the alert event is
read back from the server. Everything runs under a temporary
PREFECT_HOME (the developer's
~/.prefect is never read). Every process started here, and every descendant (the worker starts flow
runs in their own sessions), carries a marker variable in its environment; the test stops them all
and asserts that none is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from sacv.audit.digest import run_slug
from sacv.config import parse_config
from sacv.io.rundir import RunDir
from tasks.publish import ALERT_EVENT, resource_id
from tests.flow_helpers import SMALL_TEST, write_collection

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
MARKER = "SACV_DEPLOY_TEST_MARKER"
TABLES = ("contributions", "image_scores", "vectors")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path.name}: unreadable>"
    return f"--- {path.name} (last {n} chars) ---\n{text[-n:]}"


def _api(url: str, body: dict | None = None, timeout: float = 10) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST" if data else "GET", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def _marked_pids(token: str) -> list[int]:
    """Processes (other than this one) whose environment holds MARKER=token."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stop(proc: subprocess.Popen, first: int, wait: float) -> None:
    """Signal the process (then its group) and escalate to SIGTERM, then SIGKILL."""
    for sig, timeout in ((first, wait), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    for sig in (signal.SIGTERM, signal.SIGKILL):  # whatever is left in its session's group
        try:
            os.killpg(proc.pid, sig)
            time.sleep(0.5)
        except (ProcessLookupError, PermissionError):
            break
    if proc.poll() is None:
        proc.wait(timeout=10)


def _add_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(123)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"new_{i}.png")


FAILING_CHECK = {"kind": "min_spatial_score", "concept": "striped", "class_name": "cat", "layer": "features.2"}


def _write_config(tmp_path: Path, checks: list[dict] | None = None) -> Path:
    root = tmp_path / "collection"
    if not root.is_dir():
        write_collection(root)
    raw = {
        "run_dir": str(tmp_path / "run"),
        "model": {"spec": "tests.models:small"},
        "layers": ["features.2"],
        "concepts": {"root": str(root / "concepts"), "random_sets": 3, "images_per_set": 4, **SMALL_TEST},
        "dataset": {"root": str(root / "data"), "target": "label"},
        "extract": {"shard_size": 4, "batch_size": 3},
        "fit": {"solver": "lbfgs"},
        "score": {"min_images": 1},
        "execution": {"device": "cpu", "workers": 1},
        "checks": checks or [],
    }
    parse_config(raw)  # fail here, not in the worker, if the config is invalid
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_audit_deployment_runs_on_a_process_worker(tmp_path):
    config_path = _write_config(tmp_path)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no developer profile
    env.update(
        {
            "PREFECT_HOME": str(tmp_path / "prefect_home"),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # default 15 s between polls
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            MARKER: token,
        }
    )
    env.pop("SACV_PROJECT_DIR", None)  # exercise the default: the directory `prefect deploy` runs in
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "pool", "deploy", "worker", "trigger")}
    started: list[tuple[subprocess.Popen, int, float]] = []  # (process, first signal, grace seconds)

    def spawn(name: str, *args: str, first=signal.SIGTERM, grace: float = 20) -> subprocess.Popen:
        with open(logs[name], "wb") as out:
            proc = subprocess.Popen(
                [PREFECT, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append((proc, first, grace))
        return proc

    def run(name: str, *args: str, timeout: float = 180) -> str:
        with open(logs[name], "wb") as out:
            done = subprocess.run(
                [PREFECT, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        text = logs[name].read_text(errors="replace")
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}\n{text[-4000:]}"
        return text

    def debug() -> str:
        return "\n".join(_tail(path) for path in logs.values() if path.exists())

    t0 = time.monotonic()
    timings = {}
    try:
        server = spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"server exited {server.returncode}\n{debug()}"
            try:
                _api(f"{api}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                assert time.monotonic() < deadline, f"server not healthy after 90 s\n{debug()}"
                time.sleep(0.5)
        timings["server"] = time.monotonic() - t0

        run("pool", "work-pool", "create", "sacv-process", "--type", "process")
        run("deploy", "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        timings["deploy"] = time.monotonic() - t0
        for name in ("audit", "concept-sweep"):
            deployment = _api(f"{api}/deployments/name/sacv-audit/{name}")
            assert deployment["work_pool_name"] == "sacv-process"
            assert deployment["pull_steps"] == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
            ], deployment["pull_steps"]
        audit = _api(f"{api}/deployments/name/sacv-audit/audit")
        assert [s["schedule"]["cron"] for s in audit["schedules"]] == ["0 2 * * *"]
        assert audit["schedules"][0]["schedule"]["timezone"] == "UTC"
        assert audit["schedules"][0]["active"] is False  # inactive until config_path names a real config
        described = audit["parameter_openapi_schema"]["properties"]["config_path"]
        assert described["type"] == "string" and "YAML config" in described["description"]
        assert _api(f"{api}/deployments/name/sacv-audit/concept-sweep")["schedules"] == []
        assert audit["job_variables"]["env"] == {"PREFECT_LOGGING_EXTRA_LOGGERS": "sacv"}  # the sacv logger

        spawn("worker", "worker", "start", "--pool", "sacv-process", first=signal.SIGINT, grace=30)

        def audit_run(expected: str = "COMPLETED") -> dict:
            """Trigger the nightly deployment once and wait for its flow run to end ``expected``."""
            out = run("trigger", "deployment", "run", "sacv-audit/audit", "--param", f"config_path={config_path}")
            match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
            assert match, f"no flow run id in:\n{out}"
            deadline = time.monotonic() + 300
            while True:
                flow_run = _api(f"{api}/flow_runs/{match.group(1)}")
                state = (flow_run.get("state") or {}).get("type")
                if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                assert time.monotonic() < deadline, f"flow run still {state} after 300 s\n{debug()}"
                time.sleep(1)
            assert state == expected, f"flow run ended {state}: {flow_run['state'].get('message')}\n{debug()}"
            return flow_run

        flow_run = audit_run()
        timings["run"] = time.monotonic() - t0
        for table in TABLES:
            assert table in RunDir(str(tmp_path / "run")).table_names(), f"{table} missing\n{debug()}"
        tested = pd.read_parquet(tmp_path / "run" / "tables" / "contributions.parquet")
        assert tested["p_value"].notna().all(), f"untested contributions:\n{tested[['concept', 'reason']]}"
        assert (tested["n_reference"] == SMALL_TEST["pseudo_concepts"]).all()  # each concept's own family
        assert flow_run["parameters"] == {"config_path": str(config_path)}
        assert re.fullmatch(rf"audit-{config_path.stem}-\d{{8}}-\d{{4}}", flow_run["name"]), flow_run["name"]
        # The flow run process imports flows/__init__.py, whose embedded defaults switch off server
        # services; they must not reach this server: its task runs are still recorded.
        deadline = time.monotonic() + 20
        while not _api(f"{api}/task_runs/count", {}) and time.monotonic() < deadline:
            time.sleep(1)
        assert _api(f"{api}/task_runs/count", {}) > 0, f"no task runs recorded\n{debug()}"
        assert (tmp_path / "run" / "report" / "index.html").is_file(), f"no report\n{debug()}"
        slug = run_slug(str(tmp_path / "run"))
        keys = [f"{slug}-{part}" for part in ("report", "contributions", "drift", "checks", "summary")]
        artifacts = _api(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": keys}}})
        assert sorted(a["key"] for a in artifacts) == sorted(keys), artifacts
        assert all(a["flow_run_id"] == flow_run["id"] for a in artifacts)
        by_key = {a["key"]: a for a in artifacts}
        assert "report/index.html" in by_key[f"{slug}-report"]["data"]
        assert by_key[f"{slug}-contributions"]["type"] == "table" and by_key[f"{slug}-checks"]["data"] == "[]"
        assert "## Time per stage" in by_key[f"{slug}-summary"]["data"]

        # The next night: two new images arrive, and a policy check no row can pass (a spatial
        # score of at least 1); the same run_dir is audited incrementally.
        _add_images(tmp_path / "collection" / "data" / "cat", 2)
        _write_config(tmp_path, checks=[{**FAILING_CHECK, "value": 1.0}])
        failed = audit_run(expected="FAILED")
        timings["second run"] = time.monotonic() - t0
        message = failed["state"]["message"]
        assert message.startswith("1 of 1 policy check rows failed") and "Traceback" not in message, message
        filter_ = {"event": {"name": [ALERT_EVENT]}, "resource": {"id": [resource_id(slug)]}}
        deadline = time.monotonic() + 30  # the server persists events in batches
        while not (events := _api(f"{api}/events/filter", {"filter": filter_, "limit": 5})["events"]):
            assert time.monotonic() < deadline, f"no {ALERT_EVENT} event after 30 s\n{debug()}"
            time.sleep(1)
        assert len(events) == 1 and events[0]["payload"]["run_dir"] == str(tmp_path / "run"), events
        assert [row["row"] for row in events[0]["payload"]["failed_checks"]] == ["features.2 / striped -> cat"]
        checks = _api(f"{api}/artifacts/latest/filter", {"artifacts": {"key": {"any_": [f"{slug}-checks"]}}})
        assert checks[0]["flow_run_id"] == failed["id"] and "striped" in checks[0]["data"], checks
        audits = pd.read_parquet(tmp_path / "run" / "tables" / "audits.parquet")
        assert audits["status"].tolist() == ["done", "done"] and audits["checks_failed"].tolist()[1] == 1, audits
        # 8 dataset images filled shards 0-1 (shard_size 4): the 2 new ones are one new shard, nothing else
        assert audits["images_added"].tolist() == [23, 2] and audits["shards_run"].tolist()[1] == 1, audits
        assert audits["images_extracted"].tolist()[1] == 2
        history = pd.read_parquet(tmp_path / "run" / "tables" / "history" / "contributions.parquet")
        assert list(dict.fromkeys(history["audit_id"])) == audits["audit_id"].tolist()
    finally:
        for proc, first, grace in reversed(started):  # worker first, then the server
            _stop(proc, first, grace)
        leftover = _marked_pids(token)
        for pid in leftover:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        timings["stopped"] = time.monotonic() - t0
        print(f"\ndeployment test timings (s since start): { {k: round(v, 1) for k, v in timings.items()} }")
    assert not leftover, f"processes left running after shutdown: {leftover}\n{debug()}"
