"""Fitting tasks: plan the vectors, fit one block of jobs of a layer, collect them into the store and table."""

from __future__ import annotations

from contextlib import nullcontext

from prefect import get_run_logger, task

from sacv.config import RunConfig
from sacv.fit import fit_plan, sweep
from sacv.io import storage
from sacv.io.handoffs import FitPlan
from sacv.io.rundir import RunDir


@task(name="plan-fits")
def plan_fits(run_uri: str, config: RunConfig) -> FitPlan:
    """Write the fit plan; return the keys of the jobs without a cached result, cut into blocks."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    plan = fit_plan.plan_fits(run_uri, config)
    get_run_logger().info(
        "%d vectors planned, %d to fit (the rest cached) in %d blocks", plan.total, len(plan.todo), len(plan.blocks)
    )
    return plan


@task(name="fit-block", retries=1, retry_delay_seconds=2)
def fit_block(run_uri: str, config: RunConfig, layer: str, keys: list[str]) -> dict:
    """Fit the planned jobs ``keys`` of ``layer`` from one read; dask work goes to the flow's cluster when
    one is configured."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    if config.execution.dask_address:
        from prefect_dask import get_dask_client

        cluster = get_dask_client()
    else:
        cluster = nullcontext()
    with cluster:
        results = sweep.fit_block(run_uri, config, layer, keys)
    logger = get_run_logger()
    near = [r for r in results if r["near_chance"] and r["kind"] == "concept"]  # pseudo-concepts: near chance by design
    logger.info(
        "%s: %d vectors (%s), median bal_acc %.3f",
        layer,
        len(results),
        config.fit.solver,
        sorted(r["bal_acc"] for r in results)[len(results) // 2],
    )
    for r in near:
        logger.warning(
            "near-chance vector: %s %s vs %s, held-out balanced accuracy %.3f",
            layer,
            r["concept"],
            r["random_set"],
            r["bal_acc"],
        )
    return {"layer": layer, "vectors": len(results), "near_chance": len(near)}


@task(name="collect-vectors")
def collect_vectors(run_uri: str, config: RunConfig) -> str:
    """Write the store's vectors and tables/vectors.parquet from the results; return the table's URI."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    table = fit_plan.collect_vectors(run_uri)
    concept = table[table["kind"] == "concept"]
    get_run_logger().info("%d vectors, %d concept vectors near chance", len(table), int(concept["near_chance"].sum()))
    return RunDir(run_uri).table_uri("vectors")
