"""Extraction tasks: plan the run, extract one shard."""

from __future__ import annotations

from prefect import get_run_logger, task

from sacv import extraction
from sacv.config import RunConfig, numeric_warnings
from sacv.plans import ExtractPlan


@task(name="plan-extraction")
def plan_extraction(run_uri: str, config: RunConfig, audit_id: str | None = None) -> ExtractPlan:
    """Scan collections, write images/rejects tables and the store template; return the shard plan."""
    plan = extraction.plan_extraction(run_uri, config, audit_id)
    logger = get_run_logger()
    logger.info("%d images (%d added, %d removed), %d rejected, shards %s, %d to do", plan.images, plan.added,
                plan.removed, plan.rejects, plan.shards, len(plan.todo))
    for warning in numeric_warnings(config):
        logger.warning(warning)
    return plan


@task(name="extract-shard", retries=1, retry_delay_seconds=2)
def extract_shard(run_uri: str, config: RunConfig, group: str, shard: int) -> dict:
    """Extract one shard (= one Zarr chunk) and write its done-marker last; return the marker."""
    try:
        marker = extraction.run_shard(run_uri, config, group, shard)
    except Exception as err:
        raise RuntimeError(f"shard {group}/{shard} failed: {err}") from err
    get_run_logger().info("shard %s/%d: %d images in %.1f s", group, shard, marker["images"], marker["seconds"])
    return marker
