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
import io

import numpy as np
import pandas as pd
import torch
import zarr

from sacv.config import RunConfig
from sacv.extract import extract
from sacv.maps import ConceptMaps, concept_maps
from sacv.rundir import RunDir
from sacv.shards import ShardImages, cached_model, shard_batches, shard_targets
from sacv.store import ensure_array, write_region

SUMMARY_NAMES = ["s_k_max", "s_k_mean", "relevant_frac", "s_kc_sum", "s_kc_relevant_mean", "positive_frac", "argmax_i", "argmax_j"]
SCORE_COLUMNS = ["image_id", "row", "layer", "concept", "random_set", "kind", "vector_row", "target", *SUMMARY_NAMES]


def summarize(activations: np.ndarray, gradients: np.ndarray, vectors: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """activations, gradients (n, H, W, C); vectors (K, C); offsets (K,) -> summaries, each (n, K)."""
    return summarize_maps(concept_maps(activations, vectors, offsets, gradients))


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


def _table(summary: dict[str, np.ndarray], rows: pd.DataFrame, targets: np.ndarray, layer: str, vectors: pd.DataFrame) -> pd.DataFrame:
    n, k = summary["s_k_max"].shape
    table = pd.DataFrame({name: values.reshape(-1) for name, values in summary.items()})
    table.insert(0, "image_id", np.repeat(rows["image_id"].to_numpy(), k))
    table.insert(1, "row", np.repeat(rows["row"].to_numpy(dtype=np.int64), k))
    table.insert(2, "layer", layer)
    for column in ("concept", "random_set", "kind", "vector_row"):
        table.insert(len(table.columns) - len(SUMMARY_NAMES), column, np.tile(vectors[column].to_numpy(), n))
    table.insert(len(table.columns) - len(SUMMARY_NAMES), "target", np.repeat(targets.astype(np.int64), k))
    return table[SCORE_COLUMNS]


def _layer_vectors(run: RunDir, layer: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    table = run.read_table("vectors")
    if table is None or layer not in set(table["layer"]):
        raise RuntimeError(f"no fitted vectors for layer {layer!r} in {run.uri}; run the fit stage first")
    group = zarr.open_group(run.store_uri, mode="r")[f"vectors/{layer}"]
    return group["v"][...], group["b"][...], table[table["layer"] == layer].sort_values("vector_row")


def score_shard(run_uri: str, config: RunConfig, shard: int, mode: str) -> pd.DataFrame:
    """Scores of one dataset shard for every layer and vector (``mode``: blockwise | streamed)."""
    run = RunDir(run_uri)
    images = run.read_table("images")
    rows = images[(images["group"] == "dataset") & (images["shard"] == shard) & (images["status"] == "ok")].sort_values("row")
    start, stop = int(rows["row"].iloc[0]), int(rows["row"].iloc[-1]) + 1
    if mode == "blockwise":
        store = zarr.open_group(run.store_uri, mode="r")
        if f"dataset/{config.layers[0]}/grad" not in store:
            raise RuntimeError("blockwise scoring needs stored gradients: set extract.keep_gradients: true, or score.mode: streamed")
        targets = store["dataset/targets"][start:stop]
        per_layer = {layer: (store[f"dataset/{layer}/act"][start:stop], store[f"dataset/{layer}/grad"][start:stop]) for layer in config.layers}
    elif mode == "streamed":
        per_layer, targets = _recompute(run, config, rows)
    else:
        raise ValueError(f"score.mode must be blockwise or streamed, got {mode!r}")
    tables = []
    for layer, (act, grad) in per_layer.items():
        vectors, offsets, vector_table = _layer_vectors(run, layer)
        maps = concept_maps(act.astype(np.float32), vectors, offsets, grad.astype(np.float32))
        if config.score.store_maps:  # this shard's rows are whole chunks of the map arrays: one writer
            store = zarr.open_group(run.store_uri, mode="r+")
            write_region(store[f"maps/{layer}/S_k"], start, maps.s_k)
            write_region(store[f"maps/{layer}/S_kc"], start, maps.s_kc)
        tables.append(_table(summarize_maps(maps), rows, np.asarray(targets), layer, vector_table))
    return pd.concat(tables, ignore_index=True)


def prepare_map_arrays(run: RunDir, config: RunConfig) -> None:
    """Template of ``maps/<layer>/S_k`` and ``S_kc`` (N, K, H, W) float16, chunks of one dataset shard."""
    store = zarr.open_group(run.store_uri, mode="r+")
    n = store["dataset/targets"].shape[0]
    for layer in config.layers:
        k = len(run.read_table("vectors").query("layer == @layer"))
        h, w, _ = store.attrs["layers"][layer]
        for name in ("S_k", "S_kc"):
            ensure_array(store, f"maps/{layer}/{name}", (n, k, h, w), config.extract.shard_size, "float16",
                         dimension_names=["image", "vector", "row", "col"])


def _recompute(run: RunDir, config: RunConfig, rows: pd.DataFrame):
    """Forward + backward on the shard's images; activations/gradients rounded to the store dtype."""
    model = cached_model(config.model.spec, config.model.weights, config.execution.device)
    device = next(model.module.parameters()).device
    loader = shard_batches(ShardImages(rows, model, config), config.extract.batch_size,
                           config.execution.loader_workers, pin=device.type == "cuda")
    targets = shard_targets(config, rows, model.class_names)
    parts, target_parts, done = {layer: ([], []) for layer in config.layers}, [], 0
    for batch in loader:
        batch_targets = targets[done : done + len(batch)] if isinstance(targets, torch.Tensor) else targets
        result = extract(model.module, batch, config.layers, batch_targets)
        for layer in config.layers:
            parts[layer][0].append(result.activations[layer].numpy().astype(config.extract.dtype))
            parts[layer][1].append(result.gradients[layer].numpy().astype(config.extract.dtype))
        target_parts.append(result.targets.numpy())
        done += len(batch)
    per_layer = {layer: (np.concatenate(a), np.concatenate(g)) for layer, (a, g) in parts.items()}
    return per_layer, np.concatenate(target_parts)


def shard_score_key(run: RunDir, config: RunConfig, shard: int) -> str:
    """What a shard's scores depend on: its images, the vectors, the layers and the mode."""
    images = run.read_table("images")
    rows = images[(images["group"] == "dataset") & (images["shard"] == shard) & (images["status"] == "ok")]
    vectors = run.read_table("vectors")
    content = [sorted(rows["image_id"]), list(vectors["key"]), list(vectors["concept"]), list(vectors["random_set"]),
               sorted(config.layers), config.score.mode, config.score.store_maps,
               config.dataset.target if config.dataset else None]
    return hashlib.sha256(repr(content).encode()).hexdigest()[:16]


def write_shard_scores(run_uri: str, config: RunConfig, shard: int) -> int:
    """Score one shard, write ``scores/<shard>.parquet`` and then its marker (with the content key)."""
    run = RunDir(run_uri)
    table = score_shard(run_uri, config, shard, config.score.mode)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    run.write_bytes(f"scores/{shard:06d}.parquet", buffer.getvalue())
    run.write_json(f"scores/{shard:06d}.json", {"key": shard_score_key(run, config, shard), "rows": len(table)})
    return len(table)


def stale_shards(run: RunDir, config: RunConfig, shards: list[int]) -> list[int]:
    """Shards whose marker is missing or was written for other content."""
    return [s for s in shards if (run.read_json(f"scores/{s:06d}.json") or {}).get("key") != shard_score_key(run, config, s)]


def build_tables(run_uri: str, config: RunConfig, shards: list[int], class_names: list[str]) -> dict:
    """``image_scores.parquet`` from the shard scores, then ``contributions.parquet``."""
    from sacv.contributions import contributions

    run = RunDir(run_uri)
    parts = [pd.read_parquet(io.BytesIO(run.fs.cat_file(f"{run.root}/scores/{s:06d}.parquet"))) for s in shards]
    scores = pd.concat(parts, ignore_index=True)
    table = contributions(scores, class_names, config.score.alpha, config.score.correction, config.score.min_images,
                          config.score.statistic)
    return {
        "image_scores": run.write_table("image_scores", scores),
        "contributions": run.write_table("contributions", table),
        "rows": len(table),
        "significant": int(table["significant"].sum()),
    }


def dataset_shards(run: RunDir) -> list[int]:
    images = run.read_table("images")
    if images is None or not (images["group"] == "dataset").any():
        raise RuntimeError(f"{run.uri} has no dataset images; add a `dataset` section and run the extract stage")
    return sorted(int(s) for s in images.loc[images["group"] == "dataset", "shard"].unique())
