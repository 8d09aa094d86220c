"""Task runner choice and how a stage's flow is called."""

from __future__ import annotations

import time

from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from sacv.config import ExecutionConfig, RunConfig
from sacv.rundir import RunDir


def task_runner(execution: ExecutionConfig):
    """A thread pool by default, an existing Dask cluster when an address is set."""
    if execution.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=execution.dask_address)
    return ThreadPoolTaskRunner(max_workers=execution.workers)


def call_flow(flow, config: RunConfig) -> dict:
    """Run ``flow(config)`` with the config's task runner. In the embedded mode (no Prefect API
    configured) flow-run heartbeats are off: they let a server detect crashed runs, and cost about
    a second per flow run (measured)."""
    configured = flow.with_options(task_runner=task_runner(config.execution))
    if PREFECT_API_URL.value():
        return configured(config)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return configured(config)


def finish_stage(run_uri: str, stage: str, summary: dict, started: float) -> dict:
    """Add the stage's wall time, record it in run.json and the flow log; return the summary."""
    from prefect import get_run_logger

    summary["seconds"] = round(time.perf_counter() - started, 2)
    RunDir(run_uri).update_run_record(timings={stage: summary})
    get_run_logger().info("%s %s: %s", stage, summary.get("status", "done"), summary)
    return summary
