"""The extraction stage: extract blocks of shards into the store (task bodies; the plan is
``sacv.extract.extraction_plan``).

A shard is a contiguous block of store rows = one Zarr chunk along N, so exactly one writer owns it.
Its done-marker (``RunDir.write_shard_marker``) is written after all of its arrays and records a
digest of its stored image ids (removed and quarantined ones included: a removal changes no shard)
and settings: a rerun skips a shard whose marker matches and redoes any other. Rows are append-only
(``sacv.extract.catalog``), so new images only change the shards that gain rows; a redone shard writes
zeros in the rows of removed or quarantined images (nothing reads those rows). ``run_shards``
overlaps decoding, compute and chunk writes over a block of shards; ``_extractions`` is the one
batch loop, also behind ``shard_extractions`` (streamed scoring). The per-batch primitive is
``sacv.method.activations.extract``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

from sacv.config import RunConfig
from sacv.errors import InputError
from sacv.extract.catalog import REJECT_COLUMNS, ImageCatalog, write_images
from sacv.extract.decode_pool import ShardImages, decoded_shards
from sacv.extract.extraction_plan import shard_digest, store_layout
from sacv.extract.image_sources import match_class
from sacv.extract.shard_writes import OpenArrays, submit_shard_writes
from sacv.io.device_decode import EncodedJpeg, decode_batch
from sacv.io.images import ImageRejected
from sacv.io.provenance import this_process
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import open_store
from sacv.method.activations import Extraction, extract, halving_on_oom, use_torch_threads
from sacv.method.models import LoadedModel, cached_model


def shard_targets(config: RunConfig, rows: pd.DataFrame, class_names: list[str]) -> torch.Tensor | int | None:
    """The classes whose logit is differentiated: (n,) int64 labels, one class index, or None (predicted)."""
    target = config.dataset.target if config.dataset else "predicted"
    if target == "predicted":
        return None
    if target == "label":
        if rows["label"].isna().any():
            raise InputError("dataset.target is 'label' but some images have no label; give labels or use 'predicted'")
        return torch.tensor(rows["label"].astype("int64").to_numpy())
    return match_class(target, class_names)


def model_inputs(
    batch: list, model: LoadedModel, device: torch.device
) -> tuple[torch.Tensor, dict[int, ImageRejected | None]]:
    """A batch of items (``sacv.extract.decode_pool``) as the model's input (B, 3, S, S) float32 on ``device``,
    and the items that are no image (a reject, or None) by their index in the batch (zeros there).

    Encoded JPEGs are decoded on the device in one call; uint8 pixels are stacked, copied to the
    device (pinned on CUDA) and normalised there."""
    encoded = [i for i, item in enumerate(batch) if isinstance(item, EncodedJpeg)]
    decoded = (
        dict(zip(encoded, decode_batch([batch[i] for i in encoded], model.preprocessing, device))) if encoded else {}
    )
    items = [decoded.get(i, item) for i, item in enumerate(batch)]
    missing = {i: item for i, item in enumerate(items) if not isinstance(item, torch.Tensor)}
    pixels = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor) and item.dtype == torch.uint8]
    if pixels:
        stacked = torch.stack([items[i] for i in pixels])  # (P, S, S, 3) uint8
        stacked = stacked.pin_memory() if device.type == "cuda" else stacked
        normalised = model.preprocessing.normalize(stacked.to(device, non_blocking=True))  # (P, 3, S, S)
        if len(pixels) == len(batch):
            return normalised, missing
    size = model.preprocessing.crop or next(item.shape[-2] for item in items if isinstance(item, torch.Tensor))
    inputs = torch.zeros(len(batch), 3, size, size, device=device)
    if pixels:
        inputs[pixels] = normalised
    for i, item in decoded.items():
        if isinstance(item, torch.Tensor):
            inputs[i] = item
    return inputs, missing


def _extractions(
    items: Iterator, model: LoadedModel, config: RunConfig, targets, with_gradients: bool
) -> Iterator[tuple[Extraction, dict[int, ImageRejected | None]]]:
    """Batches of ``config.extract.batch_size`` items through :func:`sacv.method.activations.extract`; yields
    each batch's extraction with the items that were no image, by their index in the shard.
    Activations and gradients come in the store's dtype (``extract.dtype``), cast on the device."""
    device = next(model.module.parameters()).device
    store_dtype = getattr(torch, config.extract.dtype)
    autocast = None if config.extract.autocast == "none" else getattr(torch, config.extract.autocast)
    done, batch = 0, []

    def forward(inputs: torch.Tensor, batch_targets) -> Extraction:
        return extract(
            model.module,
            inputs,
            config.layers,
            batch_targets,
            with_gradients=with_gradients,
            autocast=autocast,
            allow_tf32=config.execution.allow_tf32,
            dtype=store_dtype,
        )

    def run(batch: list) -> tuple[Extraction, dict[int, ImageRejected | None]]:
        inputs, missing = model_inputs(batch, model, device)
        batch_targets = targets[done : done + len(batch)] if isinstance(targets, torch.Tensor) else targets
        return halving_on_oom(forward, inputs, batch_targets), {done + i: item for i, item in missing.items()}

    for item in items:
        batch.append(item)
        if len(batch) == config.extract.batch_size:
            yield run(batch)
            done, batch = done + len(batch), []
    if batch:
        yield run(batch)


def batch_warnings(config: RunConfig) -> list[str]:
    """A batch size over the shard size, said once per run: batches never run past a shard's end
    (:func:`_extractions`), so fewer images than asked go through the model at once."""
    size, batch = config.extract.shard_size, config.extract.batch_size
    if batch <= size:
        return []
    return [
        f"extract.batch_size is {batch} but extract.shard_size is {size}: batches never span shards, so "
        f"at most {size} images go through the model at once; set shard_size to a multiple of batch_size "
        "in a new run_dir (docs/config.md, on a GPU)"
    ]


def shard_extractions(
    rows: pd.DataFrame, model: LoadedModel, config: RunConfig, with_gradients: bool
) -> Iterator[Extraction]:
    """The batch loop over images that decoded at extraction (``rows`` in row order, status ok), for
    streamed scoring: an image that fails now is an error, not a reject."""
    images = ShardImages(rows, model.preprocessing, config)
    items = next(decoded_shards([images], config.execution.loader_workers, config.execution.loader))
    targets = shard_targets(config, images.rows, model.class_names) if with_gradients else None
    for result, blanks in _extractions(items, model, config, targets, with_gradients):
        if blanks:
            index, reason = next(iter(blanks.items()))
            raise RuntimeError(
                f"{images.rows['path'].iloc[index]} decoded at extraction but not now ({reason}); "
                "run the extract stage again"
            )
        yield result


def _timed(items: Iterator, timing: dict[str, float]) -> Iterator:
    """``items`` unchanged; adds the seconds spent waiting for each item to ``timing["decode_wait_s"]``."""
    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            timing["decode_wait_s"] += time.perf_counter() - started
        yield item


def _shard_arrays(
    extractions: Iterator, config: RunConfig, group: str, gradients: bool
) -> tuple[dict[str, np.ndarray], dict[int, ImageRejected | None]]:
    """One shard's arrays by store path (activations ``(n, H, W, C)`` per layer; for the dataset also
    gradients, logits ``(n, K)`` and targets ``(n,)``), in row order, and its images without one
    (index in the shard: why, or None when an earlier run listed it). Their rows are zeros (targets
    -1): never read, their status is not ok."""
    parts: dict[str, list[np.ndarray]] = {}
    missing: dict[int, ImageRejected | None] = {}
    for result, blanks in extractions:
        missing |= blanks
        for layer in config.layers:
            parts.setdefault(f"{group}/{layer}/act", []).append(result.activations[layer].numpy())
            if gradients and config.extract.keep_gradients:
                parts.setdefault(f"{group}/{layer}/grad", []).append(result.gradients[layer].numpy())
        if gradients:
            parts.setdefault("dataset/logits", []).append(result.logits.numpy())
            parts.setdefault("dataset/targets", []).append(result.targets.numpy())
    arrays = {path: np.concatenate(values) for path, values in parts.items()}
    for i in missing:
        for path, values in arrays.items():
            values[i] = -1 if path == "dataset/targets" else 0
    return arrays, missing


def _shard_rejects(rows: pd.DataFrame, missing: dict[int, ImageRejected | None], group: str) -> list[dict]:
    """The rows of the shard's rejects file: images quarantined in this run (None: listed earlier)."""
    return [
        {
            "path": rows["path"].iloc[i],
            "group": group,
            "stage": reason.stage,
            "reason": reason.reason,
            "image_id": rows["image_id"].iloc[i],
        }
        for i, reason in missing.items()
        if reason is not None
    ]


def run_shards(
    run_uri: str, config: RunConfig, group: str, shards: list[int], then: tuple[str, int] | None = None
) -> list[dict]:
    """Extract a block of shards of ``group`` with decode, compute and writes overlapping.

    Decoding runs ahead in a pool (``execution.loader_workers``, ``sacv.extract.decode_pool``; at
    most two shards ahead); ``then`` = (group, shard), the shard this process extracts next (the next
    task's first), is decoded ahead too, while this block's last shard is computed and written (in
    this thread without a pool), and held for that task. The model runs in this thread, and each
    finished shard's arrays go to a pool of ``execution.write_workers`` writer threads, one job per
    array (at most that many shards waiting). Each chunk has exactly one writer, and a shard's
    marker is written after all of its arrays (``sacv.extract.shard_writes``). An image that fails to decode (or
    changed since planning) is quarantined: its row is written as zeros (target -1) and it is listed
    in the shard's rejects file; rows of removed or earlier quarantined images are written as zeros
    too (their files may be gone; nothing reads those rows). A guidance shard's writers also write the
    per-image position statistics of each layer (``sacv.extract.position_stats``: sums, sums of squares, counts
    of the stored values) and marks them in the marker (``pos_stats``). Returns the markers, in
    shard order.

    Each marker's ``timing`` splits the model thread's time on that shard: ``writer_wait_s``
    (blocked on a full writer queue before the shard started), ``decode_wait_s`` (waiting for
    decoded images), ``compute_s`` (batching, the model, device copies); and ``write_s``, from
    the start of the shard's first write job to its marker (statistics, regions, rejects, marker;
    the jobs run side by side).
    """
    use_torch_threads(config.execution.torch_threads)  # the model runs in this thread
    run = RunDir(run_uri)
    ahead = [then[1]] if then is not None and then[0] == group else []
    catalog = ImageCatalog.for_shards(run, group, shards + ahead)  # only the row groups of these shards
    model = cached_model(
        config.model.spec, config.model.weights, config.execution.device, **config.model.loader_options()
    )
    root = open_store(run.store_uri, store_layout(model, config.layers, config.extract.dtype), run.storage_options)
    array_of = OpenArrays(root)
    gradients = group == "dataset"
    blocks = [ShardImages(catalog.stored_rows(group, shard), model.preprocessing, config) for shard in shards]
    following = None
    if then is not None:
        rows = (catalog if ahead else ImageCatalog.for_shards(run, then[0], [then[1]])).stored_rows(*then)
        following = ShardImages(rows, model.preprocessing, config)
    decoded = decoded_shards(blocks, config.execution.loader_workers, config.execution.loader, following)
    markers, pending, blocked = [], deque(), 0.0  # blocked: seconds the model thread waited for a free writer
    with ThreadPoolExecutor(config.execution.write_workers, thread_name_prefix="sacv-write") as writers:
        for shard, images in zip(shards, blocks):
            items = next(decoded)
            started, started_at = time.perf_counter(), time.time()
            rows = images.rows
            targets = shard_targets(config, rows, model.class_names) if gradients else None
            timing = {"writer_wait_s": blocked, "decode_wait_s": 0.0}
            extractions = _extractions(_timed(items, timing), model, config, targets, gradients)
            arrays, missing = _shard_arrays(extractions, config, group, gradients)
            rejects = _shard_rejects(rows, missing, group)
            start = int(rows["row"].iloc[0])
            timing["compute_s"] = time.perf_counter() - started - timing["decode_wait_s"]  # batches, model, copies
            marker = {
                "digest": shard_digest(rows, config),
                "rows": [start, start + len(rows)],
                "images": len(rows) - len(missing),
                "rejected": len(rejects),
                "started_at": started_at,
                "process": this_process(),  # on a cluster: the worker
                "timing": {key: round(value, 4) for key, value in timing.items()},
            }
            pending.append(
                submit_shard_writes(
                    writers, run, array_of, group, shard, start, arrays, marker, rejects, started, sorted(missing)
                )
            )
            waited = time.perf_counter()
            while len(pending) > config.execution.write_workers:
                markers.append(pending.popleft().result())
            blocked = time.perf_counter() - waited  # counted in the next shard's timing
        next(decoded, None)  # the next task's first shard, decoded ahead while the last writes run
        markers += [future.result() for future in pending]
    return markers


def record_shard_rejects(run_uri: str) -> int:
    """Merge the rejects the shards found into ``rejects.parquet`` and mark those images
    ``rejected`` in ``images.parquet`` (one writer: call once, after every shard). Returns the
    number of rows of the rejects table."""
    run = RunDir(run_uri)
    found = run.read_shard_rejects()
    rejects = run.read_table("rejects")
    if found:
        new = pd.DataFrame(found, columns=REJECT_COLUMNS)
        rejects = pd.concat([rejects, new], ignore_index=True).drop_duplicates(["path", "image_id"], keep="first")
        images = run.read_table("images")
        bad = pd.Series(list(zip(images["path"], images["image_id"])), index=images.index).isin(
            set(zip(new["path"], new["image_id"]))
        )
        if (bad & (images["status"] == "ok")).any():
            images.loc[bad & (images["status"] == "ok"), "status"] = "rejected"
            write_images(run, images)
        run.write_table("rejects", rejects.reset_index(drop=True))
    return len(rejects)
