"""Task runner choice: a thread pool by default, an existing Dask cluster when an address is set."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from sacv.config import ExecutionConfig


def task_runner(execution: ExecutionConfig):
    if execution.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=execution.dask_address)
    return ThreadPoolTaskRunner(max_workers=execution.workers)
