"""Task runner choice, and how a stage's flow is called and timed (process set-up: flows.process)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import SettingsContext, get_settings_context
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.process import configure_process, wait_for_temporary_api
from sacv.audit.policy import ChecksFailed
from sacv.config import ExecutionConfig, RunConfig
from sacv.errors import UserError
from sacv.io import storage
from sacv.io.rundir import RunDir


def with_task_runner(flow, execution: ExecutionConfig):
    """``flow`` with a thread pool of ``execution.workers`` task workers, or the existing Dask
    cluster at ``execution.dask_address``. Made once per process and setting: ``with_options``
    rebuilds the flow's parameter schema (tens of milliseconds); each flow run works on its own copy
    of the task runner, so one flow object serves every call."""
    return _with_task_runner(flow, execution.workers, execution.dask_address)


@functools.lru_cache(maxsize=32)
def _with_task_runner(flow, workers: int, dask_address: str | None):
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return flow.with_options(task_runner=DaskTaskRunner(address=dask_address))
    return flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))


_HEARTBEATS_OFF: list = []  # [(settings, a copy with flow-run heartbeats off)]: the last copy made


@contextlib.contextmanager
def heartbeats_off():
    """Prefect's current settings with flow-run heartbeats off, entered as ``temporary_settings``
    does. The copy is made once per settings object (making one takes tens of milliseconds), so
    ``PREFECT_*`` environment variables changed after the first call in a process are not seen
    (``flows.process.configure_process`` sets its own before any flow run)."""
    context = get_settings_context()
    entry = _HEARTBEATS_OFF[0] if _HEARTBEATS_OFF else None
    if entry is None or entry[0] is not context.settings:
        entry = (context.settings, context.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
        _HEARTBEATS_OFF[:] = [entry]
    with SettingsContext(profile=context.profile, settings=entry[1]):
        yield


def with_torch_threads(config: RunConfig) -> RunConfig:
    """``config`` with ``execution.torch_threads`` resolved: None becomes this (the flow) process's torch
    thread count, so every task, here or on a Dask worker, computes with the same count and the CPU
    numbers do not depend on where a task ran (docs/deploy.md)."""
    if config.execution.torch_threads is not None:
        return config
    import torch

    execution = config.execution.model_copy(update={"torch_threads": torch.get_num_threads()})
    return config.model_copy(update={"execution": execution})


class Progress:
    """A progress artifact of the running flow run (per cent), updated as shards or jobs complete."""

    def __init__(self, total: int, description: str) -> None:
        self.total, self.done, self.shown = total, 0, 0 if total else 100
        self.artifact = create_progress_artifact(float(self.shown), description=description)

    def advance(self, n: int = 1) -> None:
        self.done += n
        percent = 100 * self.done // max(self.total, 1)
        if percent > self.shown:  # at most one update per whole per cent
            self.shown = percent
            update_progress_artifact(self.artifact, float(percent))


def known_failures(fn):
    """For a flow function: a ``UserError`` or ``ChecksFailed`` ends the flow run Failed with the
    error's message as the state's message, not logged with a traceback; a caller of the flow gets
    the error raised, as before."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ChecksFailed) as err:
            return Failed(message=str(err), data=err)

    return run


def call_flow(flow, config: RunConfig):
    """Run ``flow(config)`` with the config's task runner. In the embedded mode (no Prefect API
    configured) flow-run heartbeats are off: they let a server detect crashed runs, and cost about
    a second per flow run (measured). A temporary API started early (``flows.process``) is waited
    for first. ``execution.torch_threads`` is resolved here (:func:`with_torch_threads`)."""
    configure_process()
    wait_for_temporary_api()
    config = with_torch_threads(config)
    storage.use(config.storage_options)
    configured = with_task_runner(flow, config.execution)
    if PREFECT_API_URL.value():
        return configured(config)
    with heartbeats_off():
        return configured(config)


def finish_stage(run_uri: str, stage: str, summary, started: float):
    """Set the stage summary's wall time, record it in run.json and the flow log; return it."""
    from prefect import get_run_logger

    summary = dataclasses.replace(summary, seconds=round(time.perf_counter() - started, 2))
    RunDir(run_uri).update_run_record(timings={stage: dataclasses.asdict(summary)})
    get_run_logger().info("%s %s: %s", stage, summary.status, summary)
    return summary
