"""Compaction (``sacv compact RUN_DIR``): give the images of a store contiguous rows again.

Audits never move a row (``sacv.extract.catalog``): a removed image keeps its row, and the bytes in it, for
the life of the store. Compaction is the one explicit exception. In each group the images that own
a row (status ``ok`` or ``rejected``) get rows ``0 .. n-1`` in their present order, so an image can
only move down; removed images leave ``images.parquet`` together with their rows; duplicates follow
their image. No image file is read and nothing is extracted again.

Steps of :func:`compact`, under the run lock, each safe to interrupt:

1. merge shard rejects not yet recorded; plan the new rows and, per group, ``first``: the first
   shard whose rows change (the shards before it are kept as they are, markers and scores too);
2. remove the done-markers of the group's shards from ``first`` on, and the scores of those
   dataset shards (a score key is over image ids, not rows: a shard whose rows moved could keep a
   matching key);
3. write ``images.parquet`` with the new rows. From here on, a shard without a marker is extracted
   again by the next ``sacv run``: that is what an interrupted compaction leaves behind;
4. for each new shard from ``first`` on, in ascending order: read its images from their old rows
   (at or after the new ones, so in chunks not rewritten yet) in every per-image array
   (``<group>/...``, and ``maps/...`` for the dataset), write the shard's chunk of each (one writer
   per chunk), then its marker, last;
5. shrink every per-image array to the new number of rows (zarr deletes the chunks past the end).

Fit results are keyed by image content, not rows, and stay valid. The tables other than
``images`` name old rows until the next ``sacv run``, which scores the shards from ``first`` on
(from the stored activations, without extraction) and rebuilds them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sacv.config import RunConfig, parse_config
from sacv.errors import NotYetRun
from sacv.extract import position_stats
from sacv.extract.catalog import LIVE, ImageCatalog, write_images
from sacv.extract.extraction import record_shard_rejects
from sacv.extract.extraction_plan import shard_digest
from sacv.io import runlock
from sacv.io.provenance import this_process
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import write_region


@dataclass(frozen=True)
class CompactSummary:
    rows_before: dict[str, int]  # group -> rows of its arrays before compaction
    rows_after: dict[str, int]  # group -> rows after
    shards_rewritten: dict[str, int]  # group -> shards whose chunks were rewritten
    removed: int  # removed images dropped from images.parquet
    bytes_before: int  # bytes under store.zarr/
    bytes_after: int


@dataclass(frozen=True)
class GroupPlan:
    old_rows: np.ndarray  # (n,) int64: the old row of each new row 0 .. n-1
    rows_before: int  # rows of the group's arrays before
    first: int  # first new shard to rewrite (= number of new shards when none)


def plan_rows(images: pd.DataFrame, shard_size: int) -> tuple[pd.DataFrame, dict[str, GroupPlan]]:
    """The images table after compaction (removed images dropped, new rows and shards) and the
    plan of each group."""
    kept = images[images["status"] != "removed"].copy()
    plans = {}
    for group, stored in images[images["row"].notna()].groupby("group"):
        rows_before = int(stored["row"].max()) + 1
        old_rows = np.sort(stored.loc[stored["status"].isin(LIVE), "row"].to_numpy(np.int64))
        new_of = pd.Series(np.arange(len(old_rows)), index=old_rows)
        in_group = kept["group"] == group
        kept.loc[in_group, "row"] = new_of.reindex(kept.loc[in_group, "row"].to_numpy(np.int64)).to_numpy()
        moved = np.flatnonzero(old_rows != np.arange(len(old_rows)))
        if len(moved):
            first = int(moved[0]) // shard_size
        elif len(old_rows) < rows_before:  # only the last rows go: the new last shard's marker changes
            first = len(old_rows) // shard_size
        else:
            first = -(-len(old_rows) // shard_size)  # nothing to rewrite
        plans[group] = GroupPlan(old_rows, rows_before, first)
    kept["row"] = kept["row"].astype("Int64")
    kept["shard"] = (kept["row"] // shard_size).astype("Int64")
    kept = kept.assign(duplicate=kept["status"] == "duplicate").sort_values(
        ["group", "row", "duplicate"], kind="stable"
    )
    return kept.drop(columns="duplicate").reset_index(drop=True), plans


def per_image_arrays(root, group: str) -> list:
    """Every array with one row per image of ``group``: ``<group>/...``, and ``maps/...`` (dataset)."""
    found = []

    def walk(node):
        for _, array in node.arrays():
            found.append(array)
        for _, sub in node.groups():
            walk(sub)

    for prefix in [group] + (["maps"] if group == "dataset" else []):
        if prefix in root:
            walk(root[prefix])
    return found


def _rewrite_shard(arrays: list, plan: GroupPlan, shard: int, shard_size: int) -> None:
    """One new shard's chunk of every array, read from the old rows of its images."""
    start, stop = shard * shard_size, min((shard + 1) * shard_size, len(plan.old_rows))
    old = plan.old_rows[start:stop]
    for array in arrays:
        if array.shape[0] != plan.rows_before:  # maps not grown since images were added: rescored next run
            continue
        values = np.asarray(array[int(old[0]) : int(old[-1]) + 1])[old - old[0]]
        end = min(start + shard_size, array.shape[0])  # the whole chunk; rows past `stop` go at the resize
        if end > stop:
            values = np.concatenate([values, np.zeros((end - stop, *values.shape[1:]), values.dtype)])
        write_region(array, start, values)


def run_config(run: RunDir) -> RunConfig:
    """The config of the run directory's last run (run.json): what its shard markers depend on."""
    record = run.read_run_record() or {}
    if "config" not in record:
        raise NotYetRun(f"{run.uri} has no run.json with a config; run `sacv run` on it first")
    return parse_config(record["config"], source=f"{run.uri}/run.json config")


def compact(run_uri: str, wait_s: float = 0, ttl_s: float = 120) -> CompactSummary:
    """Compact the store of ``run_uri`` (module docstring); a store without removed rows is left
    as it is, except arrays longer than their rows (an interrupted compaction), which are shrunk."""
    run = RunDir(run_uri)
    with runlock.acquire(run, wait_s=wait_s, ttl_s=ttl_s):
        config = run_config(run)
        size = config.extract.shard_size
        record_shard_rejects(run.uri)
        images = run.read_table("images")
        if images is None:
            raise NotYetRun(f"{run.uri} has no images table; nothing to compact")
        bytes_before = run.store_bytes()
        table, plans = plan_rows(images, size)
        # statistics move with the rows: rewritten shards keep the flag if every old shard had them
        with_stats = {
            group: bool(run.marked_shards(group))
            and all(
                (run.read_shard_marker(group, shard) or {}).get(position_stats.MARKER_FLAG)
                for shard in run.marked_shards(group)
            )
            for group in plans
        }
        for group, plan in plans.items():  # 2. nothing marks a shard from `first` on as done
            for shard in run.marked_shards(group):
                if shard >= plan.first:
                    run.remove_shard_marker(group, shard)
            if group == "dataset":
                run.forget_score_tables()  # they name the old rows
                for shard in run.scored_shards():
                    if shard >= plan.first:
                        run.remove_shard_scores(shard)
        write_images(run, table)  # 3.
        catalog, root = ImageCatalog(table), run.open_zarr("r+")
        rewritten = {}
        for group, plan in plans.items():  # 4. and 5.
            arrays = per_image_arrays(root, group)
            shards = range(plan.first, -(-len(plan.old_rows) // size))
            for shard in shards:
                started, started_at = time.perf_counter(), time.time()
                _rewrite_shard(arrays, plan, shard, size)
                rows, seconds = catalog.stored_rows(group, shard), time.perf_counter() - started
                run.write_shard_marker(
                    group,
                    shard,
                    {  # the fields of an extraction marker, and `compacted`
                        "digest": shard_digest(rows, config),
                        "rows": [int(rows["row"].iloc[0]), int(rows["row"].iloc[-1]) + 1],
                        "images": int((rows["status"] == "ok").sum()),
                        "rejected": 0,
                        "compacted": True,
                        "started_at": started_at,
                        "process": this_process(),
                        "timing": {
                            "writer_wait_s": 0.0,
                            "decode_wait_s": 0.0,
                            "compute_s": 0.0,
                            "write_s": round(seconds, 4),
                        },
                        **({position_stats.MARKER_FLAG: True} if with_stats[group] else {}),
                        "seconds": round(seconds, 3),
                        "finished_at": time.time(),
                    },
                )
            for array in arrays:
                if array.shape[0] != len(plan.old_rows):
                    array.resize((len(plan.old_rows), *array.shape[1:]))
            rewritten[group] = len(shards)
        summary = CompactSummary(
            rows_before={g: p.rows_before for g, p in plans.items()},
            rows_after={g: len(p.old_rows) for g, p in plans.items()},
            shards_rewritten=rewritten,
            removed=int((images["status"] == "removed").sum()),
            bytes_before=bytes_before,
            bytes_after=run.store_bytes(),
        )
        run.update_run_record(compaction={"at": time.time(), **dataclasses.asdict(summary)})
        return summary


def describe(summary: CompactSummary) -> str:
    """What ``sacv compact`` prints."""
    lines = [
        f"{group}: {summary.rows_before[group]} -> {summary.rows_after[group]} rows, "
        f"{summary.shards_rewritten[group]} shards rewritten"
        for group in sorted(summary.rows_after)
    ]
    lines.append(
        f"{summary.removed} removed images dropped; store {summary.bytes_before / 1e6:.2f} MB -> "
        f"{summary.bytes_after / 1e6:.2f} MB"
    )
    if any(summary.shards_rewritten.values()):
        lines.append(
            "the next `sacv run` scores the rewritten dataset shards again and rebuilds the tables "
            "(nothing is extracted)"
        )
    return "\n".join(lines)
