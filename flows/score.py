"""The scoring flow: one task per dataset shard, then the image and contribution tables."""

from __future__ import annotations

import time

from prefect import flow
from prefect.futures import as_completed

from flows.runners import Progress, call_flow, finish_stage, known_failures
from sacv.config import RunConfig
from sacv.io.handoffs import ScoreSummary
from tasks.score import build_tables, plan_scoring, score_shard


@flow(name="sacv-score")
@known_failures
def score_flow(config: RunConfig) -> ScoreSummary:
    started = time.perf_counter()
    run_uri = config.run_dir
    plan = plan_scoring(run_uri, config)
    progress = Progress(len(plan.todo), f"dataset shards scored in {run_uri}")
    for future in as_completed([score_shard.submit(run_uri, config, shard) for shard in plan.todo]):
        future.result()
        progress.advance()
    tables = build_tables(run_uri, config, plan.shards)
    summary = ScoreSummary(status="done", shards_scored=len(plan.todo), **tables)
    return finish_stage(run_uri, "score", summary, started)


def run_score(config: RunConfig) -> ScoreSummary:
    return call_flow(score_flow, config)
