"""The result tables of a whole dataset, built as a reduction over its score shards.

Each scored shard writes three files (``RunDir.write_shard_scores``, marker last):
- ``scores/<shard>.parquet``: its rows of ``image_scores`` (one per image, layer and vector);
- ``score_sums/<shard>.parquet``: its partial sums per (layer, target, concept, random set, kind)
  (``sacv.stats.contributions.vector_partials``);
- ``score_top/<shard>.parquet``: its ``TOP_K`` highest and lowest images per (layer, concept,
  target) by ``s_kc_sum`` (``extreme_images``).

``build_tables`` adds the shards' partial sums and merges their extremes, a batch of shards at a
time, so its memory grows with layers × vectors × classes and never with images:
``tables/per_set.parquet`` (the per-set values), ``tables/contributions.parquet`` (the test) and
``tables/top_images.parquet``. ``image_scores`` stays the score shards, a Parquet dataset
(``tables/image_scores.json`` lists the files of the last build).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from sacv.config import RunConfig
from sacv.errors import NotYetRun
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import class_names_of
from sacv.stats.contributions import add_partials, contribution_table, per_vector_from_partials, vector_partials

TOP_K = 20  # images kept per (layer, concept, class) at each end of the ranking
TOP_GROUP = ["layer", "concept", "target"]
TOP_MEANS = ["s_kc_sum", "s_k_max", "relevant_frac", "positive_frac"]  # per image, mean over random sets
TOP_COLUMNS = [*TOP_GROUP, "row", "image_id", *TOP_MEANS]
BATCH = 256  # shards whose partial files are read and added at once
READERS = 8  # threads reading a batch's files

log = logging.getLogger(__name__)


def image_means(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, concept, target, image) of the concept vectors' rows (``kind == "concept"``):
    the means of ``TOP_MEANS`` over the concept's random sets (NaN skipped). Columns ``TOP_COLUMNS``."""
    concept = scores[scores["kind"] == "concept"]
    means = concept.groupby([*TOP_GROUP, "row", "image_id"], sort=False)[TOP_MEANS].mean().reset_index()
    means["target"] = means["target"].astype("int64")
    means["row"] = means["row"].astype("int64")
    return means[TOP_COLUMNS]


def rank_images(means: pd.DataFrame) -> pd.DataFrame:
    """``means`` in ranking order: by group, then ``s_kc_sum`` highest first, ties by row."""
    return means.sort_values(
        [*TOP_GROUP, "s_kc_sum", "row"], ascending=[True, True, True, False, True], kind="stable", na_position="last"
    ).reset_index(drop=True)


def extreme_images(means: pd.DataFrame, k: int = TOP_K) -> pd.DataFrame:
    """The ``k`` first and ``k`` last images of each group's ranking (all of a group with ≤ 2k
    images), in ranking order. Extremes of disjoint image sets merge: the extremes of their union
    are the extremes of their extremes."""
    ranked = rank_images(means)
    position = ranked.groupby(TOP_GROUP, sort=False).cumcount().to_numpy()
    size = ranked.groupby(TOP_GROUP, sort=False)["row"].transform("size").to_numpy()
    return ranked[(position < k) | (size - 1 - position < k)].reset_index(drop=True)


def shard_aggregates(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A score shard's partial sums and extreme images (what ``write_shard_scores`` stores beside it)."""
    return vector_partials(scores), extreme_images(image_means(scores))


def _shard_aggregates(run: RunDir, shard: int) -> tuple:
    """The stored aggregates of one shard, as pyarrow tables; computed from its scores (and stored)
    first when the shard was scored before they were kept."""
    stored = run.read_shard_aggregates(shard)
    if stored is None:
        scores = run.read_shard_scores(shard)
        if scores is None:
            raise NotYetRun(f"dataset shard {shard} of {run.uri} has no scores; run the score stage again")
        run.write_shard_aggregates(shard, *shard_aggregates(scores))
        stored = run.read_shard_aggregates(shard)
    return stored


def reduce_shards(run: RunDir, shards: list[int], progress=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The dataset's partial sums and extreme images from its shards', ``BATCH`` shards at a time
    (read by ``READERS`` threads); ``progress(done, total)`` after each batch."""
    partials, top = None, None
    with ThreadPoolExecutor(READERS) as pool:
        for start in range(0, len(shards), BATCH):
            batch = list(pool.map(lambda s: _shard_aggregates(run, s), shards[start : start + BATCH]))
            partials = add_partials([p for p in (partials, *(b[0] for b in batch)) if p is not None])
            tops = [top] if top is not None else []
            top = extreme_images(pd.concat([*tops, *(b[1].to_pandas() for b in batch)], ignore_index=True))
            if progress is not None:
                progress(min(start + BATCH, len(shards)), len(shards))
    if partials is None:
        raise NotYetRun(f"{run.uri} has no scored dataset shards; run the score stage")
    return partials, top


def _remove_stale_scores(run: RunDir, shards: list[int]) -> None:
    """Scores of shards that no longer hold current images (every image removed) leave the dataset."""
    for shard in sorted(set(run.scored_shards()) - set(shards)):
        run.remove_shard_scores(shard)


def build_tables(run_uri: str, config: RunConfig, shards: list[int]) -> dict:
    """``per_set``, ``contributions`` and ``top_images`` tables from the shards' aggregates, and the
    ``image_scores`` dataset's file list. Returns the URIs and the contributions' counts."""
    run = RunDir(run_uri)

    def progress(done: int, total: int) -> None:
        log.info("tables: %d of %d score shards added", done, total)

    partials, top = reduce_shards(run, shards, progress)
    per_set = per_vector_from_partials(partials)
    table = contribution_table(
        per_set,
        class_names_of(run.store_uri, run.storage_options),
        config.score.alpha,
        config.score.correction,
        config.score.min_images,
        config.score.statistic,
    )
    rows = int(np.sum(partials["n_images"].to_numpy()))
    built = {
        "image_scores": run.write_score_dataset(shards, rows),  # listed before stale files go
        "per_set": run.write_table("per_set", per_set),
        "top_images": run.write_table("top_images", top),
        "contributions": run.write_table("contributions", table),
        "rows": len(table),
        "significant": int(table["significant"].sum()),
    }
    _remove_stale_scores(run, shards)
    return built
