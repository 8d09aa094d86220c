"""The extraction flow: plan shards, then one task per shard, resumable."""

from __future__ import annotations

import time

from prefect import flow
from prefect.futures import as_completed
from tqdm import tqdm

from flows.runners import call_flow, finish_stage
from sacv.config import RunConfig
from sacv.plans import ExtractSummary
from sacv.provenance import versions
from sacv.rundir import RunDir
from tasks.extract import extract_shard, plan_extraction


@flow(name="sacv-extract")
def extract_flow(config: RunConfig, audit_id: str | None = None) -> ExtractSummary:
    """Extract activations (and dataset gradients) of every layer into the run's store; ``audit_id``
    marks the images this scan adds or removes (a new id when not given)."""
    started = time.perf_counter()
    run_uri = config.run_dir
    plan = plan_extraction(run_uri, config, audit_id)
    futures = [extract_shard.submit(run_uri, config, group, shard) for group, shard in plan.todo]
    n_images = 0
    with tqdm(total=len(futures), unit="shard", desc="extract", disable=None) as bar:
        for future in as_completed(futures):
            n_images += future.result()["images"]
            bar.update(1)
            bar.set_postfix(images=n_images)
    summary = ExtractSummary(
        status="done with rejects" if plan.rejects else "done",
        images=plan.images, rejects=plan.rejects, shards=plan.shards, shards_run=len(futures),
        images_extracted=n_images, added=plan.added, removed=plan.removed,
    )
    numerics = {"autocast": config.extract.autocast, "allow_tf32": config.execution.allow_tf32}
    RunDir(run_uri).update_run_record(config=config.model_dump(mode="json"), versions=versions(), model=plan.model,
                                      numerics=numerics)
    return finish_stage(run_uri, "extract", summary, started)


def run_extract(config: RunConfig) -> ExtractSummary:
    return call_flow(extract_flow, config)
