"""Scoring tasks: score one dataset shard, then build the image and contribution tables."""

from __future__ import annotations

from prefect import get_run_logger, task

from sacv.config import RunConfig
from sacv.rundir import RunDir
from sacv.scoring import build_tables as build_score_tables
from sacv.scoring import dataset_shards, prepare_map_arrays, stale_shards, write_shard_scores
from sacv.shards import cached_model


@task(name="plan-scoring")
def plan(run_uri: str, config: RunConfig) -> dict:
    """Dataset shards and those whose scores are missing or stale."""
    run = RunDir(run_uri)
    shards = dataset_shards(run)
    if config.score.store_maps:
        prepare_map_arrays(run, config)  # the template, once, before the shard writers
    todo = stale_shards(run, config, shards)
    get_run_logger().info("%d dataset shards, %d to score (%s)", len(shards), len(todo), config.score.mode)
    return {"shards": shards, "todo": todo}


@task(name="score-shard", retries=1, retry_delay_seconds=2)
def score(run_uri: str, config: RunConfig, shard: int) -> str:
    """Write scores/<shard>.parquet, then its marker; return the parquet's path."""
    rows = write_shard_scores(run_uri, config, shard)
    get_run_logger().info("scored dataset shard %d: %d rows", shard, rows)
    return f"scores/{shard:06d}.parquet"


@task(name="build-tables")
def build_tables(run_uri: str, config: RunConfig, shards: list[int]) -> dict:
    """image_scores.parquet and contributions.parquet from the shard scores."""
    model = cached_model(config.model.spec, config.model.weights, config.execution.device)
    return build_score_tables(run_uri, config, shards, model.class_names)
