"""Fitting tasks: plan the vectors, fit one vector, collect them into the store and table."""

from __future__ import annotations

from contextlib import nullcontext

from prefect import get_run_logger, task

from sacv import fitting, storage
from sacv.config import RunConfig
from sacv.plans import FitPlan
from sacv.rundir import RunDir


@task(name="plan-fits")
def plan_fits(run_uri: str, config: RunConfig) -> FitPlan:
    """Write the fit plan; return the keys of the jobs without a cached result."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    plan = fitting.plan_fits(run_uri, config)
    get_run_logger().info("%d vectors planned, %d to fit (the rest cached)", plan.total, len(plan.todo))
    return plan


@task(name="fit-vector", retries=1, retry_delay_seconds=2)
def fit_vector(run_uri: str, config: RunConfig, key: str) -> dict:
    """Fit the planned job ``key``; dask work goes to the flow's cluster when one is configured."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    job = fitting.planned_job(run_uri, key)
    if config.execution.dask_address:
        from prefect_dask import get_dask_client

        cluster = get_dask_client()
    else:
        cluster = nullcontext()
    with cluster:
        result = fitting.fit_job(run_uri, config, job)
    logger = get_run_logger()
    logger.info("%s %s vs %s: bal_acc %.3f (%s, %.1f s)", job["layer"], job["concept"], job["random_set"],
                result["bal_acc"], result["solver"], result["wall_s"])
    if result["near_chance"] and job["kind"] == "concept":  # null vectors are near chance by design
        logger.warning("near-chance vector: %s %s vs %s, held-out balanced accuracy %.3f",
                       job["layer"], job["concept"], job["random_set"], result["bal_acc"])
    return {"key": key, "bal_acc": result["bal_acc"], "near_chance": result["near_chance"] and job["kind"] == "concept"}


@task(name="collect-vectors")
def collect_vectors(run_uri: str, config: RunConfig) -> str:
    """Write the store's vectors and tables/vectors.parquet from the results; return the table's URI."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    table = fitting.collect_vectors(run_uri)
    concept = table[table["kind"] == "concept"]
    get_run_logger().info("%d vectors, %d concept vectors near chance", len(table), int(concept["near_chance"].sum()))
    return RunDir(run_uri).table_uri("vectors")
