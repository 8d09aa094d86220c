"""Planning the extraction (task bodies): list the collections, check the files in batches,
catalogue them, write the store template, and say which shards are to do.

``list_collections`` lists every file once (``RUN/scan/candidates.parquet``); ``check_batch`` reads,
hashes and checks the header of one batch (``RUN/scan/checked-<k>.parquet``, one writer each; the
flow fans the batches out); ``plan_extraction`` catalogues the checked files (``sacv.extract.catalog``),
writes the store template, ``rejects.parquet`` and ``images.parquet`` (last), and returns the shards
whose marker does not match their images and settings (``shard_digest``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pandas as pd

from sacv.audit.audits import baseline_audit, new_audit_id
from sacv.audit.policy import validate_checks
from sacv.config import RunConfig, require_concept_images
from sacv.errors import InputError
from sacv.extract.catalog import (
    CHECK_COLUMNS,
    ImageCatalog,
    candidate_frame,
    catalog_from_checks,
    check_files,
    write_images,
)
from sacv.extract.decode_pool import scan_processes
from sacv.extract.image_sources import concept_candidates, dataset_candidates
from sacv.extract.position_stats import ensure_stats_arrays
from sacv.io.handoffs import ExtractPlan
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import ensure_array, open_store, store_identity, write_class_names
from sacv.method.models import LoadedModel, cached_model, layer_shapes, resolve_layers

_LAYOUTS: dict[tuple, dict] = {}


def store_layout(model: LoadedModel, layers: list[str], dtype: str) -> dict:
    """The store identity for this model and layers (cached per process: it costs a forward pass)."""
    key = (id(model), model.weight_hash, tuple(layers), dtype)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _store_layout(model, layers, dtype)
    return _LAYOUTS[key]


def _store_layout(model: LoadedModel, layers: list[str], dtype: str) -> dict:
    if not model.preprocessing.crop:
        raise InputError("a store needs a fixed input size: set a crop size in the model's preprocessing")
    resolve_layers(model.module, layers)  # unknown layers: a clear error before any work
    shapes = layer_shapes(model)
    layout = {layer: [shapes[layer][1], shapes[layer][2], shapes[layer][0]] for layer in layers}  # H, W, C
    return store_identity(model.spec, model.weight_hash, model.preprocessing.to_dict(), layout, dtype)


def prepare_store(run: RunDir, config: RunConfig, model: LoadedModel, images: pd.DataFrame) -> dict[str, int]:
    """Write the store template once (idempotent). Returns the number of shards per group."""
    identity = store_layout(model, config.layers, config.extract.dtype)
    root = open_store(run.store_uri, identity, run.storage_options)
    write_class_names(root, model.class_names)
    size = config.extract.shard_size
    shards = {}
    for group, part in images.groupby("group"):
        n = int(part["row"].max()) + 1
        for layer, (h, w, c) in identity["layers"].items():
            ensure_array(root, f"{group}/{layer}/act", (n, h, w, c), size, config.extract.dtype)
            if group == "guidance":  # per-image position statistics for the fit (sacv.extract.position_stats)
                ensure_stats_arrays(root, group, layer, n, c, size)
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
    if config.extract.decoder != "pil":
        settings["decoder"] = config.extract.decoder
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


def _candidates(run: RunDir, config: RunConfig, model: LoadedModel) -> list:
    """Every file of the configured collections, after the names the config uses are validated."""
    if config.concepts is None and config.dataset is None:
        raise InputError("the config names no images: add a `concepts` or a `dataset` section")
    candidates = concept_candidates(config.concepts) if config.concepts else []
    if config.audit.baseline is not None:  # an unknown baseline audit: an error before any work
        baseline_audit(run, config.audit.baseline)
    if config.checks:  # names in checks: an error before any work
        validate_checks(config, sorted({c.concept for c in candidates if c.role == "concept"}), model.class_names)
    if config.concepts:  # too few files for a concept: an error before any work (the fit checks usable images)
        for concept, count in sorted(Counter(c.concept for c in candidates if c.role == "concept").items()):
            require_concept_images(concept, count, config.concepts.images_per_concept)
    if config.dataset:
        candidates += dataset_candidates(config.dataset, model.class_names)
    return candidates


def list_collections(run_uri: str, config: RunConfig) -> int:
    """First step of a fanned-out plan: list every file into ``RUN/scan/candidates.parquet`` (with
    the stamps the previous images table knows); returns the number of check batches of
    ``extract.scan_batch`` files, for :func:`check_batch`."""
    run = RunDir(run_uri)
    model = cached_model(
        config.model.spec, config.model.weights, config.execution.device, **config.model.loader_options()
    )
    frame = candidate_frame(_candidates(run, config, model), run.read_table("images"))
    run.write_scan_part("candidates", frame)
    return -(-len(frame) // config.extract.scan_batch)


def _check(frame: pd.DataFrame, config: RunConfig) -> pd.DataFrame:
    """``check_files`` of the listed ``frame`` with the config's limits and workers."""
    return check_files(
        frame,
        config.extract.max_pixels,
        config.extract.min_size,
        max(4, config.execution.loader_workers),
        scan_processes(config),
    )


def check_batch(run_uri: str, config: RunConfig, index: int) -> int:
    """Read, hash and check the header of check batch ``index`` of the listed files into
    ``RUN/scan/checked-<index>.parquet`` (one writer per batch); returns the number of files."""
    run = RunDir(run_uri)
    size = config.extract.scan_batch
    frame = run.read_scan_part("candidates").iloc[index * size : (index + 1) * size]
    checked = _check(frame, config)
    run.write_scan_part(f"checked-{index:05d}", checked)
    return len(checked)


def plan_extraction(
    run_uri: str, config: RunConfig, audit_id: str | None = None, batches: int | None = None
) -> ExtractPlan:
    """Scan the collections, write images/rejects tables and the store template; plan the shards.
    Known images keep their rows (the previous images table); ``audit_id`` marks added and removed ones.
    With ``batches``, the files were listed by :func:`list_collections` and checked by that many
    :func:`check_batch` calls (the flow fans these out); without, all of it happens here."""
    run = RunDir(run_uri)
    audit_id = audit_id or new_audit_id()
    model = cached_model(
        config.model.spec, config.model.weights, config.execution.device, **config.model.loader_options()
    )
    previous = run.read_table("images")
    if (
        previous is not None
        and len(previous)
        and (previous["shard"] != previous["row"] // config.extract.shard_size).any()
    ):
        raise InputError(
            f"the store in {run.uri} was built with another extract.shard_size; keep it or use a new run_dir"
        )
    if batches is None:
        frame = candidate_frame(_candidates(run, config, model), previous)
        checked = _check(frame, config)
    else:
        frame = run.read_scan_part("candidates")
        parts = [run.read_scan_part(f"checked-{k:05d}") for k in range(batches)]
        checked = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CHECK_COLUMNS)
    images, rejects = catalog_from_checks(
        frame, checked, config.extract.shard_size, previous, audit_id, run.read_table("rejects")
    )
    if not (images["status"] == "ok").any():
        run.write_table("rejects", rejects)
        raise InputError(f"none of the {len(frame)} files is a usable image; see tables/rejects.parquet")
    shards = prepare_store(run, config, model, images)
    run.write_table("rejects", rejects)
    write_images(run, images)  # written last: a shard task reads its rows from it
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
