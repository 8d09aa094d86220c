"""Scoring tasks: score one dataset shard, then build the image and contribution tables."""

from __future__ import annotations

from prefect import get_run_logger, task

from sacv.config import RunConfig
from sacv.io import storage
from sacv.io.handoffs import ScorePlan
from sacv.score import scoring, tables


@task(name="plan-scoring")
def plan_scoring(run_uri: str, config: RunConfig) -> ScorePlan:
    """Dataset shards and those whose scores are missing or stale."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    plan = scoring.plan_scoring(run_uri, config)
    get_run_logger().info("%d dataset shards, %d to score (%s)", len(plan.shards), len(plan.todo), config.score.mode)
    return plan


@task(name="score-shard", retries=1, retry_delay_seconds=2)
def score_shard(run_uri: str, config: RunConfig, shard: int) -> int:
    """Write the shard's scores, then its marker; return the number of score rows."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    rows = scoring.write_shard_scores(run_uri, config, shard)
    get_run_logger().info("scored dataset shard %d: %d rows", shard, rows)
    return rows


@task(name="build-tables")
def build_tables(run_uri: str, config: RunConfig, shards: list[int]) -> dict:
    """per_set, contributions and top_images tables from the shards' aggregates; their URIs and counts."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    return tables.build_tables(run_uri, config, shards)
