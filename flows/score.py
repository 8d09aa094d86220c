"""The scoring flow: one task per dataset shard, then the image and contribution tables."""

from __future__ import annotations

import time

from prefect import flow

from flows.runners import call_flow, finish_stage
from sacv.config import RunConfig
from tasks.score import build_tables, plan, score


@flow(name="sacv-score")
def score_flow(config: RunConfig) -> dict:
    started = time.perf_counter()
    run_uri = config.run_dir
    shard_plan = plan(run_uri, config)
    for future in [score.submit(run_uri, config, shard) for shard in shard_plan["todo"]]:
        future.result()
    tables = build_tables(run_uri, config, shard_plan["shards"])
    summary = {"status": "done", "shards_scored": len(shard_plan["todo"]), **tables}
    return finish_stage(run_uri, "score", summary, started)


def run_score(config: RunConfig) -> dict:
    return call_flow(score_flow, config)
