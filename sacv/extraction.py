"""The extraction stage: plan the shards, then extract one shard into the store (a task body).

A shard is a contiguous block of store rows = one Zarr chunk along N, so exactly one writer owns it.
Its done-marker (``RunDir.write_shard_marker``) is written after all of its arrays and records a
digest of its stored image ids (removed ones included: a removal changes no shard) and settings:
a rerun skips a shard whose marker matches and redoes any other. Rows are append-only
(``sacv.catalog``), so new images only change the shards that gain rows; a redone shard writes
zeros in the rows of removed images (their files may be gone; nothing reads those rows). ``shard_extractions`` is the one batch loop over a shard's images; scoring in ``streamed``
mode reuses it. The per-batch primitive is ``sacv.extract.extract``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

from sacv.audits import baseline_audit, new_audit_id
from sacv.catalog import ImageCatalog, concept_candidates, dataset_candidates, match_class, scan
from sacv.checks import validate_checks
from sacv.config import RunConfig
from sacv.extract import Extraction, extract
from sacv.images import load_image
from sacv.models import LoadedModel, cached_model, layer_shapes, resolve_layers
from sacv.plans import ExtractPlan
from sacv.rundir import RunDir
from sacv.store import ensure_array, open_store, store_identity, write_class_names, write_region

_LAYOUTS: dict[tuple, dict] = {}


def store_layout(model: LoadedModel, layers: list[str], dtype: str) -> dict:
    """The store identity for this model and layers (cached per process: it costs a forward pass)."""
    key = (id(model), model.weight_hash, tuple(layers), dtype)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _store_layout(model, layers, dtype)
    return _LAYOUTS[key]


def _store_layout(model: LoadedModel, layers: list[str], dtype: str) -> dict:
    if not model.preprocessing.crop:
        raise ValueError("a store needs a fixed input size: set a crop size in the model's preprocessing")
    resolve_layers(model.module, layers)  # unknown layers: a clear error before any work
    shapes = layer_shapes(model)
    layout = {layer: [shapes[layer][1], shapes[layer][2], shapes[layer][0]] for layer in layers}  # H, W, C
    return store_identity(model.spec, model.weight_hash, model.preprocessing.to_dict(), layout, dtype)


def prepare_store(run: RunDir, config: RunConfig, model: LoadedModel, images: pd.DataFrame) -> dict[str, int]:
    """Write the store template once (idempotent). Returns the number of shards per group."""
    identity = store_layout(model, config.layers, config.extract.dtype)
    root = open_store(run.store_uri, identity)
    write_class_names(root, model.class_names)
    size = config.extract.shard_size
    shards = {}
    for group, part in images.groupby("group"):
        n = int(part["row"].max()) + 1
        for layer, (h, w, c) in identity["layers"].items():
            ensure_array(root, f"{group}/{layer}/act", (n, h, w, c), size, config.extract.dtype)
            if group == "dataset" and config.extract.keep_gradients:
                ensure_array(root, f"{group}/{layer}/grad", (n, h, w, c), size, config.extract.dtype)
        if group == "dataset":
            ensure_array(root, "dataset/logits", (n, len(model.class_names)), size, "float32")
            ensure_array(root, "dataset/targets", (n,), size, "int64")
        shards[group] = -(-n // size)
    return shards


def shard_digest(rows: pd.DataFrame, config: RunConfig) -> str:
    """What a shard's content depends on besides the store identity: its images and the settings."""
    settings = {"layers": sorted(config.layers), "autocast": config.extract.autocast}
    if config.execution.allow_tf32:
        settings["allow_tf32"] = True
    content = ",".join(rows["image_id"])
    if rows["group"].iloc[0] == "dataset":  # only dataset shards hold gradients of a target logit
        settings |= {"target": config.dataset.target, "keep_gradients": config.extract.keep_gradients}
        if config.dataset.target == "label":  # a relabelled image changes its stored gradients
            content += "|" + ",".join(str(label) for label in rows["label"])
    content += json.dumps(settings, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def shard_is_done(run: RunDir, catalog: ImageCatalog, group: str, shard: int, config: RunConfig) -> bool:
    """Whether the shard's marker matches its stored rows; a shard with no current image counts as done."""
    if catalog.rows(group, shard).empty:
        return True
    marker = run.read_shard_marker(group, shard)
    return marker is not None and marker.get("digest") == shard_digest(catalog.stored_rows(group, shard), config)


class ShardImages:
    """The shard's images, decoded, checked against their scanned id and preprocessed: (3, S, S)."""

    def __init__(self, rows: pd.DataFrame, model: LoadedModel, config: RunConfig):
        self.rows = rows.reset_index(drop=True)
        self.preprocessing = model.preprocessing
        self.limits = {"max_pixels": config.extract.max_pixels, "min_size": config.extract.min_size}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        row = self.rows.iloc[index]
        image_id, image = load_image(row["path"], **self.limits)
        if image_id != row["image_id"]:
            raise RuntimeError(f"{row['path']} changed since it was scanned; rerun to scan the collection again")
        return self.preprocessing(image)


_DECODERS: dict[int, ThreadPoolExecutor] = {}
_DECODERS_LOCK = threading.Lock()


def shard_batches(images: ShardImages, batch_size: int, workers: int, pin: bool) -> Iterator[torch.Tensor]:
    """Batches (B, 3, S, S) in row order. With ``workers`` > 0 a thread pool (one per process, kept
    across shards, so no start-up per shard) decodes the whole shard ahead of the model; ``pin``
    pins batches for non-blocking copies to CUDA."""
    if workers:
        with _DECODERS_LOCK:
            pool = _DECODERS.setdefault(workers, ThreadPoolExecutor(workers, thread_name_prefix="sacv-decode"))
        items = pool.map(images.__getitem__, range(len(images)))
    else:
        items = (images[i] for i in range(len(images)))
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield torch.stack(batch).pin_memory() if pin else torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch).pin_memory() if pin else torch.stack(batch)


def shard_targets(config: RunConfig, rows: pd.DataFrame, class_names: list[str]) -> torch.Tensor | int | None:
    """The classes whose logit is differentiated: (n,) int64 labels, one class index, or None (predicted)."""
    target = config.dataset.target if config.dataset else "predicted"
    if target == "predicted":
        return None
    if target == "label":
        if rows["label"].isna().any():
            raise ValueError("dataset.target is 'label' but some images have no label; give labels or use 'predicted'")
        return torch.tensor(rows["label"].astype("int64").to_numpy())
    return match_class(target, class_names)


def shard_extractions(rows: pd.DataFrame, model: LoadedModel, config: RunConfig, with_gradients: bool) -> Iterator[Extraction]:
    """The one batch loop over a shard's images (``rows`` in row order): decode, preprocess, then
    :func:`sacv.extract.extract` per batch with the config's layers, targets and numeric mode."""
    device = next(model.module.parameters()).device
    targets = shard_targets(config, rows, model.class_names) if with_gradients else None
    loader = shard_batches(ShardImages(rows, model, config), config.extract.batch_size,
                           config.execution.loader_workers, pin=device.type == "cuda")
    autocast = None if config.extract.autocast == "none" else getattr(torch, config.extract.autocast)
    done = 0
    for batch in loader:
        batch_targets = targets[done : done + len(batch)] if isinstance(targets, torch.Tensor) else targets
        yield extract(model.module, batch, config.layers, batch_targets, with_gradients=with_gradients,
                      autocast=autocast, allow_tf32=config.execution.allow_tf32)
        done += len(batch)


def run_shard(run_uri: str, config: RunConfig, group: str, shard: int) -> dict:
    """Extract one shard and write its region; the marker goes last. Returns the marker."""
    started = time.perf_counter()
    run = RunDir(run_uri)
    catalog = ImageCatalog.read(run)
    rows, stored = catalog.rows(group, shard), catalog.stored_rows(group, shard)
    model = cached_model(config.model.spec, config.model.weights, config.execution.device)
    root = open_store(run.store_uri, store_layout(model, config.layers, config.extract.dtype))
    gradients = group == "dataset"
    outputs: dict[str, list[np.ndarray]] = {}
    for result in shard_extractions(rows, model, config, with_gradients=gradients):
        for layer in config.layers:
            outputs.setdefault(f"{group}/{layer}/act", []).append(result.activations[layer].numpy())
            if gradients and config.extract.keep_gradients:
                outputs.setdefault(f"{group}/{layer}/grad", []).append(result.gradients[layer].numpy())
        if gradients:
            outputs.setdefault("dataset/logits", []).append(result.logits.numpy())
            outputs.setdefault("dataset/targets", []).append(result.targets.numpy())
    start = int(stored["row"].iloc[0])
    offsets = rows["row"].to_numpy(dtype=np.int64) - start  # current images within the region

    def region(parts: list[np.ndarray]) -> np.ndarray:  # (len(stored), ...): zeros in removed rows
        values = np.concatenate(parts)
        if len(offsets) == len(stored):
            return values
        full = np.zeros((len(stored), *values.shape[1:]), values.dtype)
        full[offsets] = values
        return full

    with ThreadPoolExecutor(len(outputs)) as writers:  # one writer per array; compression releases the GIL
        list(writers.map(lambda item: write_region(root[item[0]], start, region(item[1])), outputs.items()))
    marker = {
        "digest": shard_digest(stored, config),
        "rows": [start, start + len(stored)],
        "images": len(rows),
        "seconds": round(time.perf_counter() - started, 3),
        "finished_at": time.time(),
    }
    run.write_shard_marker(group, shard, marker)
    return marker


def plan_extraction(run_uri: str, config: RunConfig, audit_id: str | None = None) -> ExtractPlan:
    """Scan the collections, write images/rejects tables and the store template; plan the shards.
    Known images keep their rows (the previous images table); ``audit_id`` marks added and removed ones."""
    if config.concepts is None and config.dataset is None:
        raise ValueError("the config names no images: add a `concepts` or a `dataset` section")
    run = RunDir(run_uri)
    audit_id = audit_id or new_audit_id()
    model = cached_model(config.model.spec, config.model.weights, config.execution.device)
    candidates = concept_candidates(config.concepts) if config.concepts else []
    if config.audit.baseline is not None:  # an unknown baseline audit: an error before any work
        baseline_audit(run, config.audit.baseline)
    if config.checks:  # names in checks: an error before any work
        validate_checks(config, sorted({c.concept for c in candidates if c.role == "concept"}), model.class_names)
    if config.dataset:
        candidates += dataset_candidates(config.dataset, model.class_names)
    previous = run.read_table("images")
    if previous is not None and len(previous) and (previous["shard"] != previous["row"] // config.extract.shard_size).any():
        raise ValueError(f"the store in {run.uri} was built with another extract.shard_size; keep it or use a new run_dir")
    images, rejects = scan(candidates, config.extract.shard_size, config.extract.max_pixels, config.extract.min_size,
                           threads=max(4, config.execution.loader_workers), previous=previous, audit_id=audit_id)
    if not (images["status"] == "ok").any():
        raise ValueError(f"none of the {len(candidates)} images could be read; see tables/rejects.parquet")
    shards = prepare_store(run, config, model, images)
    run.write_table("rejects", rejects)
    run.write_table("images", images)  # written last: a shard task reads its rows from it
    catalog = ImageCatalog(images)
    todo = [(g, s) for g, n in shards.items() for s in range(n) if not shard_is_done(run, catalog, g, s, config)]
    return ExtractPlan(
        shards=shards,
        todo=todo,
        images=int((images["status"] == "ok").sum()),
        rejects=len(rejects),
        added=int(((images["status"] == "ok") & (images["added_in"] == audit_id)).sum()),
        removed=int((images["removed_in"] == audit_id).sum()),
        model={"spec": model.spec, "weight_hash": model.weight_hash, "preprocessing": model.preprocessing.to_dict()},
    )
