"""Scoring tasks: score one dataset shard, then build the image and contribution tables."""

from __future__ import annotations

import io

import pandas as pd
from prefect import get_run_logger, task

from sacv.config import RunConfig
from sacv.contributions import contributions
from sacv.rundir import RunDir
from sacv.scoring import dataset_shards, prepare_map_arrays, score_shard, shard_score_key
from sacv.shards import cached_model


@task(name="plan-scoring")
def plan(run_uri: str, config: RunConfig) -> dict:
    """Dataset shards and those whose scores are missing or stale."""
    run = RunDir(run_uri)
    shards = dataset_shards(run)
    if config.score.store_maps:
        prepare_map_arrays(run, config)  # the template, once, before the shard writers
    todo = [s for s in shards if (run.read_json(f"scores/{s:06d}.json") or {}).get("key") != shard_score_key(run, config, s)]
    get_run_logger().info("%d dataset shards, %d to score (%s)", len(shards), len(todo), config.score.mode)
    return {"shards": shards, "todo": todo}


@task(name="score-shard", retries=1, retry_delay_seconds=2)
def score(run_uri: str, config: RunConfig, shard: int) -> str:
    """Write scores/<shard>.parquet, then its marker; return the parquet's path."""
    run = RunDir(run_uri)
    table = score_shard(run_uri, config, shard, config.score.mode)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    run.write_bytes(f"scores/{shard:06d}.parquet", buffer.getvalue())
    run.write_json(f"scores/{shard:06d}.json", {"key": shard_score_key(run, config, shard), "rows": len(table)})
    get_run_logger().info("scored dataset shard %d: %d rows", shard, len(table))
    return f"scores/{shard:06d}.parquet"


@task(name="build-tables")
def build_tables(run_uri: str, config: RunConfig, shards: list[int]) -> dict:
    """image_scores.parquet and contributions.parquet from the shard scores."""
    run = RunDir(run_uri)
    parts = [pd.read_parquet(io.BytesIO(run.fs.cat_file(f"{run.root}/scores/{s:06d}.parquet"))) for s in shards]
    scores = pd.concat(parts, ignore_index=True)
    model = cached_model(config.model.spec, config.model.weights, config.execution.device)
    table = contributions(scores, model.class_names, config.score.alpha, config.score.correction, config.score.min_images)
    return {
        "image_scores": run.write_table("image_scores", scores),
        "contributions": run.write_table("contributions", table),
        "rows": len(table),
        "significant": int(table["significant"].sum()),
    }
