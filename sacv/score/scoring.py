"""Per-image concept scores for every audit image, layer and fitted vector (concept and null).

Two ways to the same numbers, one dataset shard at a time:
- ``blockwise``: read the shard's stored activations and target-logit gradients from the store;
- ``streamed``: run the model on the shard's images again and score in memory, so gradients never
  need to be stored (``extract.keep_gradients: false``).

Per (image, vector): ``s_k_max``, ``s_k_mean`` of ``S_k``; ``relevant_frac`` (share of positions with
decision ``f·v + b > 0``); ``s_kc_sum`` (sum of ``S_{k→c}``, the directional derivative of the
target logit); ``s_kc_relevant_mean`` and ``positive_frac`` (share of relevant positions with
``S_{k→c} > 0``), both NaN when no position is relevant; ``argmax_i``/``argmax_j`` of ``S_k``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from sacv.config import RunConfig, numeric_mode
from sacv.errors import InputError
from sacv.extract.catalog import ImageCatalog
from sacv.extract.extraction import shard_extractions
from sacv.io.handoffs import ScorePlan
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import ensure_array, write_region
from sacv.method.activations import use_torch_threads
from sacv.method.maps import ConceptMaps, concept_maps
from sacv.method.models import cached_model
from sacv.score.tables import shard_aggregates

SUMMARY_NAMES = [
    "s_k_max",
    "s_k_mean",
    "relevant_frac",
    "s_kc_sum",
    "s_kc_relevant_mean",
    "positive_frac",
    "argmax_i",
    "argmax_j",
]
SCORE_COLUMNS = ["image_id", "row", "layer", "concept", "random_set", "kind", "vector_row", "target", *SUMMARY_NAMES]


def summarize_maps(maps: ConceptMaps) -> dict[str, np.ndarray]:
    """Per-image summaries, each (n, K), of maps (n, K, H, W) that include S_{k→c}."""
    s_k, s_kc = maps.s_k.astype(np.float64), maps.s_kc.astype(np.float64)  # (n, K, H, W)
    relevant = maps.decision > 0
    n_relevant = relevant.sum(axis=(2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        relevant_mean = np.where(n_relevant > 0, (s_kc * relevant).sum(axis=(2, 3)) / n_relevant, np.nan)
        positive = np.where(n_relevant > 0, ((s_kc > 0) & relevant).sum(axis=(2, 3)) / n_relevant, np.nan)
    flat_argmax = s_k.reshape(*s_k.shape[:2], -1).argmax(axis=2)
    width = s_k.shape[3]
    return {
        "s_k_max": s_k.max(axis=(2, 3)),
        "s_k_mean": s_k.mean(axis=(2, 3)),
        "relevant_frac": n_relevant / (s_k.shape[2] * s_k.shape[3]),
        "s_kc_sum": s_kc.sum(axis=(2, 3)),
        "s_kc_relevant_mean": relevant_mean,
        "positive_frac": positive,
        "argmax_i": flat_argmax // width,
        "argmax_j": flat_argmax % width,
    }


def _table(
    summary: dict[str, np.ndarray], rows: pd.DataFrame, targets: np.ndarray, layer: str, vectors: pd.DataFrame
) -> pd.DataFrame:
    n, k = summary["s_k_max"].shape
    table = pd.DataFrame({name: values.reshape(-1) for name, values in summary.items()})
    table.insert(0, "image_id", np.repeat(rows["image_id"].to_numpy(), k))
    table.insert(1, "row", np.repeat(rows["row"].to_numpy(dtype=np.int64), k))
    table.insert(2, "layer", layer)
    for column in ("concept", "random_set", "kind", "vector_row"):
        table.insert(len(table.columns) - len(SUMMARY_NAMES), column, np.tile(vectors[column].to_numpy(), n))
    table.insert(len(table.columns) - len(SUMMARY_NAMES), "target", np.repeat(targets.astype(np.int64), k))
    return table[SCORE_COLUMNS]


def _layer_vectors(run: RunDir, vectors: pd.DataFrame, layer: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    if layer not in set(vectors["layer"]):
        raise RuntimeError(f"no fitted vectors for layer {layer!r} in {run.uri}; run the fit stage first")
    group = run.open_zarr("r")[f"vectors/{layer}"]
    return group["v"][...], group["b"][...], vectors[vectors["layer"] == layer].sort_values("vector_row")


def _read_vectors(run: RunDir) -> pd.DataFrame:
    vectors = run.read_table("vectors")
    if vectors is None:
        raise RuntimeError(f"no fitted vectors in {run.uri}; run the fit stage first")
    return vectors


def score_shard(run: RunDir, config: RunConfig, rows: pd.DataFrame, vectors: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Scores of one dataset shard (``rows``: its decodable images in row order; rows of images a
    shard could not decode are skipped) for every layer and vector of ``vectors`` (the vectors
    table); ``mode``: blockwise | streamed."""
    store = run.open_zarr("r")
    stored_targets = store["dataset/targets"]  # (N,) int64, opened once: an open reads its metadata
    start = int(rows["shard"].iloc[0]) * config.extract.shard_size  # the shard's region = one chunk
    stop = min(start + config.extract.shard_size, stored_targets.shape[0])
    within = rows["row"].to_numpy(dtype=np.int64) - start  # (n,) rows of the images inside the region
    if mode == "blockwise":
        if f"dataset/{config.layers[0]}/grad" not in store:
            raise RuntimeError(
                "blockwise scoring needs stored gradients: set extract.keep_gradients: true, or score.mode: streamed"
            )
        targets = stored_targets[start:stop][within]
        per_layer = {
            layer: (
                store[f"dataset/{layer}/act"][start:stop][within],
                store[f"dataset/{layer}/grad"][start:stop][within],
            )
            for layer in config.layers
        }
    elif mode == "streamed":
        per_layer, targets = recompute_layers(config, rows)
    else:
        raise ValueError(f"score.mode must be blockwise or streamed, got {mode!r}")
    tables = []
    for layer, (act, grad) in per_layer.items():
        v, offsets, vector_table = _layer_vectors(run, vectors, layer)
        maps = concept_maps(act.astype(np.float32), v, offsets, grad.astype(np.float32))
        if config.score.store_maps:  # this shard's rows are one whole chunk of the map arrays: one writer
            writable = run.open_zarr("r+")
            for name, values in (("S_k", maps.s_k), ("S_kc", maps.s_kc)):
                region = np.zeros((stop - start, *values.shape[1:]), np.float16)  # (rows, K, H, W); 0 where no image
                region[within] = values
                write_region(writable[f"maps/{layer}/{name}"], start, region)
        tables.append(_table(summarize_maps(maps), rows, np.asarray(targets), layer, vector_table))
    return pd.concat(tables, ignore_index=True)


def prepare_map_arrays(run: RunDir, config: RunConfig, vectors: pd.DataFrame) -> None:
    """Template of ``maps/<layer>/S_k`` and ``S_kc`` (N, K, H, W) float16, chunks of one dataset shard."""
    store = run.open_zarr("r+")
    n = store["dataset/targets"].shape[0]
    for layer in config.layers:
        k = int((vectors["layer"] == layer).sum())
        h, w, _ = store.attrs["layers"][layer]
        for name in ("S_k", "S_kc"):
            ensure_array(
                store,
                f"maps/{layer}/{name}",
                (n, k, h, w),
                config.extract.shard_size,
                "float16",
                dimension_names=["image", "vector", "row", "col"],
            )


def recompute_layers(config: RunConfig, rows: pd.DataFrame):
    """Forward + backward on the shard's images; activations/gradients rounded to the store dtype."""
    model = cached_model(
        config.model.spec, config.model.weights, config.execution.device, **config.model.loader_options()
    )
    parts, target_parts = {layer: ([], []) for layer in config.layers}, []
    for result in shard_extractions(rows, model, config, with_gradients=True):
        for layer in config.layers:
            parts[layer][0].append(result.activations[layer].numpy())  # in the store dtype
            parts[layer][1].append(result.gradients[layer].numpy())
        target_parts.append(result.targets.numpy())
    per_layer = {layer: (np.concatenate(a), np.concatenate(g)) for layer, (a, g) in parts.items()}
    return per_layer, np.concatenate(target_parts)


def shard_score_key(rows: pd.DataFrame, vectors: pd.DataFrame, config: RunConfig) -> str:
    """What a shard's scores depend on: its current images (and their labels when they are the
    targets), the vectors, the layers, the mode and the numeric mode (activations and gradients,
    stored or recomputed, depend on it)."""
    content = [
        sorted(rows["image_id"]),
        list(vectors["key"]),
        list(vectors["concept"]),
        list(vectors["random_set"]),
        sorted(config.layers),
        config.score.mode,
        config.score.store_maps,
        config.dataset.target if config.dataset else None,
    ]
    if numeric_mode(config):
        content.append(numeric_mode(config))
    if config.dataset and config.dataset.target == "label":  # a relabelled image has other gradients
        content.append(sorted(zip(rows["image_id"], rows["label"].astype(int))))
    return hashlib.sha256(repr(content).encode()).hexdigest()[:16]


def plan_scoring(run_uri: str, config: RunConfig) -> ScorePlan:
    """Every dataset shard, and those whose scores are missing or stale; the map arrays' template."""
    run = RunDir(run_uri)
    catalog, vectors = ImageCatalog.read(run), _read_vectors(run)
    shards = catalog.shards("dataset")
    if not shards:
        raise InputError(f"{run.uri} has no dataset images; add a `dataset` section and run the extract stage")
    if config.score.store_maps:
        prepare_map_arrays(run, config, vectors)  # the template, once, before the shard writers
    todo = [
        s for s in shards if run.shard_scores_key(s) != shard_score_key(catalog.rows("dataset", s), vectors, config)
    ]
    return ScorePlan(shards=shards, todo=todo)


def write_shard_scores(run_uri: str, config: RunConfig, shard: int) -> int:
    """Score one shard; write its scores, then its marker with the content key. Returns the rows written."""
    use_torch_threads(config.execution.torch_threads)  # maps (and a streamed model) computed in this thread
    run = RunDir(run_uri)
    rows, vectors = ImageCatalog.for_shards(run, "dataset", [shard]).rows("dataset", shard), _read_vectors(run)
    table = score_shard(run, config, rows, vectors, config.score.mode)
    run.write_shard_scores(shard, table, shard_score_key(rows, vectors, config), *shard_aggregates(table))
    return len(table)
