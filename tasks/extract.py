"""Extraction tasks: plan the run, extract a block of shards, record the rejects the shards found."""

from __future__ import annotations

from prefect import get_run_logger, task

from sacv.config import RunConfig, numeric_warnings
from sacv.extract import extraction, extraction_plan
from sacv.io import storage
from sacv.io.handoffs import ExtractPlan


@task(name="list-collections")
def list_collections(run_uri: str, config: RunConfig) -> int:
    """List every file of the collections; return the number of check batches."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    return extraction_plan.list_collections(run_uri, config)


@task(name="check-files", retries=1, retry_delay_seconds=2)
def check_batch(run_uri: str, config: RunConfig, index: int) -> int:
    """Read, hash and check the headers of one batch of listed files; return how many."""
    storage.use(config.storage_options)
    return extraction_plan.check_batch(run_uri, config, index)


@task(name="plan-extraction")
def plan_extraction(run_uri: str, config: RunConfig, audit_id: str | None, batches: int) -> ExtractPlan:
    """Catalogue the checked files, write images/rejects tables and the store template; return the shard plan."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    plan = extraction_plan.plan_extraction(run_uri, config, audit_id, batches)
    logger = get_run_logger()
    logger.info(
        "%d images (%d added, %d removed), %d rejected, shards %s, %d to do",
        plan.images,
        plan.added,
        plan.removed,
        plan.rejects,
        plan.shards,
        len(plan.todo),
    )
    for warning in numeric_warnings(config) + extraction.batch_warnings(config):
        logger.warning(warning)
    return plan


@task(name="extract-shards", retries=1, retry_delay_seconds=2)
def extract_shards(
    run_uri: str, config: RunConfig, group: str, shards: list[int], then: tuple[str, int] | None = None
) -> list[dict]:
    """Extract a block of shards (each = one Zarr chunk, marker written last); return the markers.
    ``then``: the (group, shard) this process extracts next, decoded ahead at the end of this block."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    try:
        markers = extraction.run_shards(run_uri, config, group, shards, then)
    except Exception as err:
        raise RuntimeError(f"shards {group}/{shards[0]}..{shards[-1]} failed: {err}") from err
    logger = get_run_logger()
    for shard, marker in zip(shards, markers):
        logger.info(
            "shard %s/%d: %d images, %d rejected, %.1f s",
            group,
            shard,
            marker["images"],
            marker["rejected"],
            marker["seconds"],
        )
    return markers


@task(name="record-rejects")
def record_rejects(run_uri: str, config: RunConfig) -> int:
    """Merge the shards' decode rejects into the rejects and images tables; return the rejects count."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    return extraction.record_shard_rejects(run_uri)
