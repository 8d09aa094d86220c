"""Positions of a fit block, read once from a layer's guidance activations (or streamed per pass),
handed to the solvers as blocks of whole images (``sacv.fit.solvers.Blocks``)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import zarr

from sacv.fit.solvers import Blocks

BLOCK_IMAGES = 64  # images per block handed to a solver (bounds the per-pass workspace)


class PositionReader:
    """Guidance positions of the sorted, distinct store ``rows`` of one (N, H, W, C) array.

    Resident: read once, chunk by chunk (each chunk touched read once), kept as float32
    (n, H*W, C). Streamed: every pass re-reads the chunks it needs. ``chunk_reads`` counts reads.
    """

    def __init__(self, array: zarr.Array, rows: np.ndarray, resident: bool):
        self.array, self.rows = array, np.asarray(rows, np.int64)
        _, h, w, self.channels = array.shape
        self.per_image = h * w
        self.chunk_reads = 0
        self.data = None
        if resident:
            self.data = np.empty((len(self.rows), self.per_image, self.channels), np.float32)
            for where, block in self._chunks(np.arange(len(self.rows))):
                self.data[where] = block

    def _chunks(self, local: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in ``local``, float32 (n, H*W, C)) for each store chunk touched by ``rows[local]``."""
        step = self.array.chunks[0]
        rows = self.rows[local]
        for chunk in np.unique(rows // step):
            inside = np.flatnonzero(rows // step == chunk)
            start = int(chunk) * step
            values = self.array[start : min(start + step, self.array.shape[0])]  # one chunk
            self.chunk_reads += 1
            yield (
                inside,
                values[rows[inside] - start].reshape(len(inside), self.per_image, self.channels).astype(np.float32),
            )

    def blocks(self, local: np.ndarray, runs: np.ndarray | None = None) -> Blocks:
        """The solvers' ``blocks(wanted=None)`` over images ``rows[local]``: ``image`` indexes
        ``local``; with ``wanted`` (len(local),) bool only blocks holding a wanted image are yielded
        (a streamed pass reads only the chunks of wanted images).
        ``runs`` (len(local),): a label per image, equal labels contiguous; a resident block holds
        images of one label only (the images of the same jobs: the solvers compute per block only
        the jobs its images belong to)."""
        runs = np.zeros(len(local), np.int64) if runs is None else np.asarray(runs)
        cuts = (
            np.r_[np.flatnonzero(np.r_[True, runs[1:] != runs[:-1]]), len(local)]
            if len(local)
            else np.zeros(1, np.int64)
        )

        def resident(wanted: np.ndarray | None = None):
            for start, stop in zip(cuts[:-1], cuts[1:]):
                for a in range(start, stop, BLOCK_IMAGES):
                    b = min(a + BLOCK_IMAGES, stop)
                    if wanted is None or wanted[a:b].any():
                        yield (
                            self.data[local[a:b]].reshape(-1, self.channels),
                            np.repeat(np.arange(a, b), self.per_image),
                        )

        def streamed(wanted: np.ndarray | None = None):
            chosen = np.arange(len(local)) if wanted is None else np.flatnonzero(wanted)
            for inside, values in self._chunks(local[chosen]):
                yield values.reshape(-1, self.channels), np.repeat(chosen[inside], self.per_image)

        return resident if self.data is not None else streamed

    def blocks_of(self, rows: np.ndarray, index: np.ndarray, runs: np.ndarray | None = None) -> Blocks:
        """``blocks()`` over the store ``rows`` (held by this reader, in the order given), ``image``
        mapped to ``index`` (one entry per row: e.g. the rows' positions in a group's image table);
        ``runs`` as in :meth:`blocks`."""
        local = np.searchsorted(self.rows, rows)
        if len(rows) and (
            local.max() >= len(self.rows) or (self.rows[np.minimum(local, len(self.rows) - 1)] != rows).any()
        ):
            raise ValueError("rows this reader did not read")  # a fit planned without them: a bug
        inner = self.blocks(local, runs)

        def mapped(wanted: np.ndarray | None = None):
            for x, image in inner(None if wanted is None else wanted[index]):
                yield x, index[image]

        return mapped
