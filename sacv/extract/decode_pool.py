"""Where a shard's images are read, checked and decoded: in the caller, in a pool of threads or in a
pool of processes (``execution.loader_workers``, ``execution.loader``).

Each image becomes one item, in row order: its (S, S, 3) uint8 pixels after the model's resize and
crop (normalised later, on the model's device, by ``Preprocessing.normalize``); with
``extract.decoder: torchvision`` a plain JPEG's bytes (``EncodedJpeg``, decoded on the device); the
``ImageRejected`` that says why the image cannot be used; or ``None`` for a removed image or one an
earlier run already quarantined (status ``rejected``: not tried again).

Threads share the interpreter lock with the model's thread; processes do not, which matters when
the model is fast (a GPU) and many decoders run. Process workers are forked once per process and
kept; they return uint8 arrays (a quarter of the float tensor's bytes) through a pipe, and exit
when the process that made them dies. A worker that dies fails the shard (its task's retry starts
a new pool).

Decoding also runs ahead across tasks: a task told which shard this process extracts next
(``decoded_shards(..., then=...)``) starts decoding it while its own last shard is computed and
written, and the next task's :func:`decoded_shards` takes those items instead of starting anew. At
most one such shard is held per process, in memory only (a crash loses nothing written).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pandas as pd
import torch

from sacv.config import RunConfig
from sacv.io.device_decode import EncodedJpeg, read_for_device
from sacv.io.images import ImageRejected, load_image
from sacv.method.models import Preprocessing

ITEMS_PER_PROCESS_CALL = 8  # images one call to a decode process handles (amortises the pipe's overhead)
PARENT_CHECK_S = 0.5  # how often a decode process checks that the process that made it is alive


def read_pixels(path: str, expected_id: str, preprocessing: Preprocessing, limits: dict) -> np.ndarray | ImageRejected:
    """Read, hash and decode ``path`` with PIL; its (S, S, 3) uint8 pixels, or why not (also when
    the file's content id is no longer ``expected_id``)."""
    try:
        content_id, image = load_image(path, **limits)
    except ImageRejected as rejected:
        return rejected
    if content_id != expected_id:
        return _changed()
    return preprocessing.pixels(image)


def _changed() -> ImageRejected:
    return ImageRejected("read", "file changed since planning (content hash differs); the next run plans it again")


def _read_chunk(
    files: list[tuple[str, str] | None], preprocessing: Preprocessing, limits: dict
) -> list[np.ndarray | ImageRejected | None]:
    """One decode-process call: :func:`read_pixels` of each (path, image_id); ``None`` stays ``None``."""
    return [None if file is None else read_pixels(*file, preprocessing, limits) for file in files]


def _exit_with_parent(parent: int) -> None:
    """In a decode process: exit as soon as the process that made it is gone (killed, say), so no
    orphan waits forever for work."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="sacv-parent-watch", daemon=True).start()


class ShardImages:
    """A shard's images (``rows`` in row order), as items (see the module docstring)."""

    def __init__(self, rows: pd.DataFrame, preprocessing: Preprocessing, config: RunConfig):
        self.rows = rows.reset_index(drop=True)
        self.preprocessing = preprocessing
        self.limits = {"max_pixels": config.extract.max_pixels, "min_size": config.extract.min_size}
        self.on_device = config.extract.decoder == "torchvision"
        ok = (self.rows["status"] == "ok").tolist()  # plain lists: a pandas row per image costs more than a read
        self._files = [
            (path, image_id) if keep else None
            for path, image_id, keep in zip(self.rows["path"].tolist(), self.rows["image_id"].tolist(), ok)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def key(self) -> tuple:
        """What its items depend on: the files with their content ids, and how they are decoded."""
        return tuple(self._files), self.preprocessing, tuple(self.limits.items()), self.on_device

    def files(self) -> list[tuple[str, str] | None]:
        """(path, image_id) of each row to read; ``None`` for a removed or quarantined image."""
        return list(self._files)

    def __getitem__(self, index: int) -> torch.Tensor | EncodedJpeg | ImageRejected | None:
        file = self._files[index]
        if file is None:
            return None
        path, expected_id = file
        if not self.on_device:
            item = read_pixels(path, expected_id, self.preprocessing, self.limits)
            return torch.from_numpy(item) if isinstance(item, np.ndarray) else item
        try:
            content_id, image = read_for_device(path, **self.limits)
        except ImageRejected as rejected:
            return rejected
        if content_id != expected_id:
            return _changed()
        return image if isinstance(image, EncodedJpeg) else torch.from_numpy(self.preprocessing.pixels(image))


_POOLS: dict[tuple[str, int], Executor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(kind: str, workers: int) -> Executor:
    """The process's pool of ``kind`` with ``workers`` workers, made on first use and kept across tasks."""
    with _POOLS_LOCK:
        if (kind, workers) not in _POOLS:
            if kind == "processes" and multiprocessing.current_process().daemon:
                raise RuntimeError(
                    "execution.loader 'processes' cannot start processes in this daemonic process (a "
                    "Dask worker): set execution.loader: threads, or distributed.worker.daemon: false"
                )
            if kind == "threads":
                _POOLS[kind, workers] = ThreadPoolExecutor(workers, thread_name_prefix="sacv-decode")
            else:  # fork: the workers start at once, with the modules already imported
                _POOLS[kind, workers] = ProcessPoolExecutor(
                    workers,
                    mp_context=multiprocessing.get_context("fork"),
                    initializer=_exit_with_parent,
                    initargs=(os.getpid(),),
                )
        return _POOLS[kind, workers]


def _forget(kind: str, workers: int) -> None:
    with _POOLS_LOCK:
        _POOLS.pop((kind, workers), None)


def _submit_to_processes(pool: Executor, fn: Callable, calls: list[tuple]) -> list:
    """``fn(*args)`` of each call submitted to a process pool (which may fork now)."""
    with warnings.catch_warnings():  # forking this multi-threaded process: the workers only read and decode files
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        return [pool.submit(fn, *args) for args in calls]


def _process_result(future, workers: int, work: str):
    """A process pool future's result; a dead worker is a ``RuntimeError`` and the pool is dropped
    (the next attempt forks a new one)."""
    try:
        return future.result()
    except BrokenProcessPool as err:
        _forget("processes", workers)
        raise RuntimeError(
            f"a {work} process died (out of memory, or killed); the next attempt starts a new pool, "
            "or lower execution.loader_workers"
        ) from err


def loader_kind(kind: str, shards: list[ShardImages]) -> str:
    """``execution.loader`` resolved: threads for the device decoder (they only read the files; the
    config refuses "processes" with it); "auto" is "processes" for the PIL decoder, unless this
    process may not have children (a daemonic Dask worker)."""
    if any(images.on_device for images in shards):
        return "threads"
    if kind != "auto":
        return kind
    return "threads" if multiprocessing.current_process().daemon else "processes"


def scan_processes(config: RunConfig) -> int:
    """How many processes check the files at planning (the per-file work is mostly Python, which
    threads do one at a time): ``execution.loader_workers``, in the same pool as PIL's decoders,
    unless the loader is "threads" or this process may not have children (a daemonic Dask
    worker); 0 means threads. With the device decoder "auto" decodes in threads but still scans in
    processes."""
    workers = config.execution.loader_workers
    if not workers or config.execution.loader == "threads" or multiprocessing.current_process().daemon:
        return 0
    return workers


def map_in_processes(fn: Callable, chunks: list, workers: int) -> list:
    """``fn(chunk)`` of each chunk, in order, in the process's pool of ``workers`` processes (the
    same pool as the decoders'); a worker that dies is a ``RuntimeError`` and the pool is dropped."""
    futures = _submit_to_processes(_pool("processes", workers), fn, [(chunk,) for chunk in chunks])
    return [_process_result(future, workers, "file-checking") for future in futures]


_AHEAD: dict[tuple, Iterator] = {}  # the shard decoded ahead for this process's next task: key -> its items
_AHEAD_LOCK = threading.Lock()


def _keep_ahead(images: ShardImages, items: Iterator) -> None:
    """Hold ``items`` for the :func:`decoded_shards` call that starts with ``images`` (replacing any other)."""
    with _AHEAD_LOCK:
        _AHEAD.clear()
        _AHEAD[images.key()] = items


def _take_ahead(images: ShardImages) -> Iterator | None:
    """The items decoded ahead for ``images``, if any; whatever else was held is dropped."""
    with _AHEAD_LOCK:
        items = _AHEAD.pop(images.key(), None)
        _AHEAD.clear()
        return items


def decoded_shards(
    shards: list[ShardImages], workers: int, kind: str = "auto", then: ShardImages | None = None
) -> Iterator[Iterator]:
    """For each shard in order, an iterator over its items in row order.

    With ``workers`` > 0 a pool of ``kind`` ("threads", "processes" or "auto": :func:`loader_kind`;
    one pool per process, kept across tasks) works ahead of the model: when shard k starts, shard
    k+1's images are submitted, so at most two shards of decoded images are held, and decoding
    overlaps the model's work. With 0, images decode in the caller. Processes decode with PIL.

    ``then``: the shard this process extracts next (the next task's first), decoded ahead as if it
    followed ``shards``: submitted when the last shard starts, or, without a pool, decoded in the
    caller's thread when it asks for one more item after the last shard (while that shard's writes
    run), and held for the call whose first shard it is."""
    held = _take_ahead(shards[0]) if shards else None
    if not workers:
        for k, images in enumerate(shards):
            yield held if k == 0 and held is not None else (images[i] for i in range(len(images)))
        if then is not None:
            _keep_ahead(then, iter([then[i] for i in range(len(then))]))
        return
    kind = loader_kind(kind, shards + ([then] if then is not None else []))
    pool = _pool(kind, workers)

    def submit(images: ShardImages) -> Iterator:
        if kind == "threads":
            return (future.result() for future in [pool.submit(images.__getitem__, i) for i in range(len(images))])
        files = images.files()
        futures = _submit_to_processes(
            pool,
            _read_chunk,
            [
                (files[i : i + ITEMS_PER_PROCESS_CALL], images.preprocessing, images.limits)
                for i in range(0, len(files), ITEMS_PER_PROCESS_CALL)
            ],
        )
        return (
            torch.from_numpy(item) if isinstance(item, np.ndarray) else item
            for future in futures
            for item in _process_result(future, workers, "decode")
        )

    following = shards[1:] + ([then] if then is not None else [])
    ahead = (held if held is not None else submit(shards[0])) if shards else None
    for k in range(len(shards)):
        current, ahead = ahead, submit(following[k]) if k < len(following) else None
        if k == len(shards) - 1 and ahead is not None:
            _keep_ahead(then, ahead)
        yield current
