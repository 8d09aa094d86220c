"""The extraction flow: list the files, check them in batches, plan shards, then one task per block of
shards, resumable."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prefect import flow
from prefect.futures import as_completed
from tqdm import tqdm

from flows.runners import Progress, call_flow, finish_stage, known_failures
from sacv.config import RunConfig, config_record
from sacv.io.handoffs import ExtractSummary
from sacv.io.provenance import versions
from sacv.io.rundir import RunDir
from tasks.extract import check_batch, extract_shards, list_collections, plan_extraction, record_rejects


def shard_blocks(todo: list[tuple[str, int]], per_task: int) -> list[tuple[str, list[int]]]:
    """Consecutive shards of one group, at most ``per_task`` per block."""
    blocks: list[tuple[str, list[int]]] = []
    for group, shard in todo:
        if blocks and blocks[-1][0] == group and len(blocks[-1][1]) < per_task:
            blocks[-1][1].append(shard)
        else:
            blocks.append((group, [shard]))
    return blocks


def block_markers(run_uri: str, config: RunConfig, blocks: list[tuple[str, list[int]]]) -> Iterator[list[dict]]:
    """Each block's markers as its task finishes. With one task worker and no Dask cluster the
    tasks run one after another in the flow's own thread (the model runs measurably slower in a
    task-runner thread: docs/benchmarks.md, extraction), each told the next block's first shard, which
    it decodes ahead while its own last shard is computed and written; otherwise they are submitted
    and fan out."""
    if config.execution.workers == 1 and not config.execution.dask_address:
        for k, (group, shards) in enumerate(blocks):
            then = (blocks[k + 1][0], blocks[k + 1][1][0]) if k + 1 < len(blocks) else None
            yield extract_shards(run_uri, config, group, shards, then)
        return
    futures = [extract_shards.submit(run_uri, config, group, shards) for group, shards in blocks]
    for future in as_completed(futures):
        yield future.result()


@flow(name="sacv-extract")
@known_failures
def extract_flow(config: RunConfig, audit_id: str | None = None) -> ExtractSummary:
    """Extract activations (and dataset gradients) of every layer into the run's store; ``audit_id``
    marks the images this scan adds or removes (a new id when not given)."""
    started = time.perf_counter()
    phases, since = {}, started

    def phase_done(name: str) -> None:
        nonlocal since
        now = time.perf_counter()
        phases[name], since = round(now - since, 3), now

    run_uri = config.run_dir
    batches = list_collections(run_uri, config)
    for future in [check_batch.submit(run_uri, config, k) for k in range(batches)]:
        future.result()  # the planning scan fans out over batches of files
    phase_done("scan")
    plan = plan_extraction(run_uri, config, audit_id, batches)
    phase_done("plan")
    blocks = shard_blocks(plan.todo, config.extract.shards_per_task)
    n_images = 0
    progress = Progress(len(plan.todo), f"extraction shards of {run_uri}")
    with tqdm(total=len(plan.todo), unit="shard", desc="extract", disable=None) as bar:
        for markers in block_markers(run_uri, config, blocks):
            n_images += sum(marker["images"] for marker in markers)
            bar.update(len(markers))
            progress.advance(len(markers))
            bar.set_postfix(images=n_images)
    phase_done("shards")
    rejects = record_rejects(run_uri, config)  # after every shard: one writer of the two tables
    phase_done("record")
    decode_rejects = rejects - plan.rejects
    summary = ExtractSummary(
        status="done with rejects" if rejects else "done",
        images=plan.images - decode_rejects,
        rejects=rejects,
        shards=plan.shards,
        shards_run=len(plan.todo),
        images_extracted=n_images,
        added=plan.added,
        removed=plan.removed,
        phases=phases,
    )
    numerics = {
        "autocast": config.extract.autocast,
        "allow_tf32": config.execution.allow_tf32,
        "decoder": config.extract.decoder,
    }
    RunDir(run_uri).update_run_record(
        config=config_record(config), versions=versions(), model=plan.model, numerics=numerics
    )
    return finish_stage(run_uri, "extract", summary, started)


def run_extract(config: RunConfig) -> ExtractSummary:
    return call_flow(extract_flow, config)
