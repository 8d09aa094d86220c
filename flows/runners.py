"""Process set-up, task runner choice, and how a stage's flow is called and timed."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import time

from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from sacv import storage
from sacv.config import ExecutionConfig, RunConfig
from sacv.rundir import RunDir

# Embedded default: a local ephemeral API without telemetry or the slow background services.
EMBEDDED_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
}


def configure_process() -> None:
    """Set up this process for flow runs; idempotent, call before the first flow run starts.

    - Embedded-mode defaults (``EMBEDDED_SETTINGS``) unless the environment sets them: the temporary
      local API is started as a subprocess that reads them from the environment.
    - One glibc malloc arena: torch runs in task-runner threads, and glibc gives each thread its own
      arena, which maps and unmaps large tensors anew (measured: CPU extraction 20-25 % slower in a
      worker thread than in the main thread). It must be set before those threads allocate. Dask
      worker processes need ``MALLOC_ARENA_MAX=1`` in their environment instead.
    """
    for key, value in EMBEDDED_SETTINGS.items():
        os.environ.setdefault(key, value)
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
        except (OSError, AttributeError):
            pass


def task_runner(execution: ExecutionConfig):
    """A thread pool by default, an existing Dask cluster when an address is set."""
    if execution.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=execution.dask_address)
    return ThreadPoolTaskRunner(max_workers=execution.workers)


def call_flow(flow, config: RunConfig):
    """Run ``flow(config)`` with the config's task runner. In the embedded mode (no Prefect API
    configured) flow-run heartbeats are off: they let a server detect crashed runs, and cost about
    a second per flow run (measured)."""
    configure_process()
    storage.use(config.storage_options)
    configured = flow.with_options(task_runner=task_runner(config.execution))
    if PREFECT_API_URL.value():
        return configured(config)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return configured(config)


def finish_stage(run_uri: str, stage: str, summary, started: float):
    """Set the stage summary's wall time, record it in run.json and the flow log; return it."""
    from prefect import get_run_logger

    summary = dataclasses.replace(summary, seconds=round(time.perf_counter() - started, 2))
    RunDir(run_uri).update_run_record(timings={stage: dataclasses.asdict(summary)})
    get_run_logger().info("%s %s: %s", stage, summary.status, summary)
    return summary
