"""A shard's writes: each array's region is one job in a task's pool of writer threads (each chunk
has exactly one writer), and the job that finishes last writes the shard's rejects, then its marker
(the marker is written last: its presence means the shard is done)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np
import zarr

from sacv.extract.position_stats import MARKER_FLAG, shard_stats
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import write_region


class ShardWrite:
    """One shard's writes spread over the writer pool: each array's region is one job (its chunk has
    one writer) and the job that finishes last writes the shard's rejects, then its marker. ``done``
    resolves to the marker, or to the first job's error, and then no marker is written. So the last
    shard of a task, which the model thread waits for, is written in a fraction of one writer's time."""

    def __init__(
        self, run: RunDir, group: str, shard: int, marker: dict, rejects: list[dict], started: float, jobs: int
    ):
        self.done: Future = Future()
        self._run, self._group, self._shard, self._marker, self._rejects = run, group, shard, marker, rejects
        self._started, self._left, self._first = started, jobs, None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def job(self, write: Callable[[], None]) -> None:
        """Run one region's ``write`` in a writer thread; the last job to finish completes the shard."""
        begun = time.perf_counter()
        try:
            write()
        except BaseException as err:  # kept for ``done``; the pool's own future is never read
            with self._lock:
                self._error = self._error or err
        with self._lock:
            self._first = begun if self._first is None else min(self._first, begun)
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        if self._error is not None:
            self.done.set_exception(self._error)
            return
        try:
            self._run.write_shard_rejects(self._group, self._shard, self._rejects)
            finished = time.perf_counter()
            timing = {**self._marker["timing"], "write_s": round(finished - self._first, 4)}
            marker = {
                **self._marker,
                "timing": timing,
                "seconds": round(finished - self._started, 3),
                "finished_at": time.time(),
            }
            self._run.write_shard_marker(self._group, self._shard, marker)
        except BaseException as err:
            self.done.set_exception(err)
        else:
            self.done.set_result(marker)


class OpenArrays:
    """``root[path]``, each array opened once (an open reads its metadata: a request on object
    storage), shared by the writer threads of a task."""

    def __init__(self, root: zarr.Group):
        self._root, self._arrays, self._lock = root, {}, threading.Lock()

    def __call__(self, path: str) -> zarr.Array:
        with self._lock:
            if path not in self._arrays:
                self._arrays[path] = self._root[path]
            return self._arrays[path]


def write_array(
    array_of: Callable[[str], zarr.Array],
    path: str,
    start: int,
    values: np.ndarray,
    shard: str,
    stats_dtype=None,
    blank: list[int] | None = None,
) -> None:
    """Write one array's region of a shard (``array_of``: store path -> array, ``shard`` =
    "group/index", for the error). With
    ``stats_dtype`` (the activations of a guidance shard) also the per-image statistics of the values
    as stored (``sacv.extract.position_stats``), in their own arrays, after the activations."""
    regions = {path: values}
    if stats_dtype is not None:
        prefix = path.rsplit("/", 1)[0]
        regions |= {f"{prefix}/{name}": stats for name, stats in shard_stats(values, stats_dtype, blank).items()}
    for name, region in regions.items():
        try:
            write_region(array_of(name), start, region)
        except Exception as err:
            raise RuntimeError(
                f"writing {name} rows {start}:{start + len(region)} (shard {shard}) failed: {err}"
            ) from err


def submit_shard_writes(
    writers: ThreadPoolExecutor,
    run: RunDir,
    array_of: Callable[[str], zarr.Array],
    group: str,
    shard: int,
    start: int,
    arrays: dict[str, np.ndarray],
    marker: dict,
    rejects: list[dict],
    started: float,
    blank: list[int],
) -> Future:
    """Submit a shard's arrays to the writer pool, one job per array (largest first); returns the
    future of its marker. A guidance shard's activation jobs also write their statistics, flagged
    in the marker (``pos_stats``)."""
    stats = group == "guidance"
    if stats:
        marker = {**marker, MARKER_FLAG: True}
    write = ShardWrite(run, group, shard, marker, rejects, started, len(arrays))
    for path, values in sorted(arrays.items(), key=lambda item: -item[1].nbytes):
        with_stats = stats and path.endswith("/act")
        writers.submit(
            write.job,
            partial(
                write_array,
                array_of,
                path,
                start,
                values,
                f"{group}/{shard}",
                array_of(path).dtype if with_stats else None,
                blank,
            ),
        )
    return write.done
