"""The whole pipeline as one parent flow: extract -> fit -> score, each stage its own sub-flow."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger

from flows.extract import extract_flow, run_extract
from flows.fit import fit_flow, run_fit
from flows.process import configure_process
from flows.runners import call_flow, known_failures, with_task_runner, with_torch_threads
from flows.score import run_score, score_flow
from sacv.audit.audits import new_audit_id, record_audit
from sacv.audit.policy import ChecksFailed, failure_message
from sacv.config import RunConfig, load_config
from sacv.io import runlock, storage
from sacv.io.handoffs import RunSummary
from sacv.io.rundir import RunDir
from tasks.publish import build_report, publish_audit

STAGES = ("extract", "fit", "score", "run")


@flow(name="sacv-run")
@known_failures
def run_flow(config: RunConfig) -> RunSummary:
    """Run every stage as one audit; a rerun resumes (done shards, cached vectors and scored shards
    are skipped). The audit is recorded last (``sacv.audit.audits.record_audit``), also when a stage fails;
    failing policy checks (config ``checks``) then fail the flow run with ``ChecksFailed``."""
    audit_id, started = new_audit_id(), time.time()
    extract = fit = score = None
    try:
        extract = with_task_runner(extract_flow, config.execution)(config, audit_id)
        if config.concepts is not None:
            fit = with_task_runner(fit_flow, config.execution)(config)
        if config.concepts is not None and config.dataset is not None:
            score = with_task_runner(score_flow, config.execution)(config)
    except BaseException as err:
        try:  # the stage's error is what the caller must see, even if the record cannot be written
            record_audit(
                config.run_dir,
                audit_id,
                started,
                config,
                extract,
                status="failed",
                message=f"{type(err).__name__}: {err}"[:500],
            )
        except Exception as record_err:
            get_run_logger().warning("could not record failed audit %s: %s", audit_id, record_err)
        raise
    checks = record_audit(config.run_dir, audit_id, started, config, extract, scored=score is not None)
    if checks is not None and not checks["passed"].all():
        raise ChecksFailed(failure_message(checks))  # the flow run ends Failed with the failing checks
    return RunSummary(extract=extract, fit=fit, score=score, audit_id=audit_id)


def audit_run_name() -> str:
    """A flow run's name: ``audit-<config file name>-<UTC date and time>``, e.g. ``audit-nightly-20261204-0200``."""
    from prefect.runtime import flow_run

    stem = Path(str(flow_run.parameters.get("config_path", "config"))).stem
    return f"audit-{stem}-{datetime.now(UTC):%Y%m%d-%H%M}"


@flow(name="sacv-audit", flow_run_name=audit_run_name)
@known_failures
def audit_flow(config_path: str) -> RunSummary:
    """Deployment entry point: the whole pipeline (extract, fit, score; one audit) from a config
    file, then, once the audit is recorded (also when its policy checks failed), the report and the
    audit's artifacts, and the ``sacv.audit.alert`` event when checks failed or drift is significant.

    Args:
        config_path: the run's YAML config (docs/config.md), absolute or relative to the project
            root on the worker. A rerun on the same run_dir resumes and audits only what changed.
    """
    configure_process()
    config = with_torch_threads(load_config(config_path))
    storage.use(config.storage_options)
    with run_lock(config):
        state = run_flow(config, return_state=True)
        if state.is_completed() or isinstance(state.result(raise_on_failure=False), ChecksFailed):
            publish_audit(config.run_dir, config, build_report(config.run_dir, config))
    return state.result()  # the pipeline's error, if any, is raised again: the flow run ends with its message


def run_pipeline(config: RunConfig) -> RunSummary:
    return call_flow(run_flow, config)


def run_stage(stage: str, config: RunConfig):
    """Run one stage's flow (or the whole pipeline, ``run``) with the task runner the config asks for."""
    runners = {"extract": run_extract, "fit": run_fit, "score": run_score, "run": run_pipeline}
    if stage not in runners:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    with run_lock(config):
        return runners[stage](config)


def run_lock(config: RunConfig) -> runlock.RunLock:
    """Hold ``RUN/lock.json`` (sacv.io.runlock): a second run on the same run_dir waits or stops."""
    run = RunDir(config.run_dir, storage.options_for(config.run_dir, config.storage_options))
    return runlock.acquire(run, wait_s=config.execution.lock_wait_s, ttl_s=config.execution.lock_ttl_s)
