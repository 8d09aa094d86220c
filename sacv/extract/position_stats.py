"""Per-image sufficient statistics of the guidance positions, written at extraction time.

For every guidance image (store row ``n``) and layer, over the image's ``H×W`` positions:

- ``guidance/<layer>/pos_sum``   (N, C) float64: ``Σ_ij act[n, i, j, :]``
- ``guidance/<layer>/pos_sqsum`` (N, C) float64: ``Σ_ij act[n, i, j, :]²``
- ``guidance/<layer>/pos_count`` (N,)   int64:   ``H·W``; 0 for a row that holds no image (rejected,
  removed: written as zeros)

They are computed from the activations **as stored** (cast to ``extract.dtype``, then widened to
float64), not from the float32 values before the cast: the fit reads the stored values back for
everything else (solver passes, held-out scores), so statistics of the same numbers keep a vector
from stored statistics equal to one from the positions, and a store with and one without statistics
give the same vectors. float64, because a float32 sum over ``H·W`` positions (up to 12 544 at
112×112) loses about four digits, and variances are differences of such sums.

The arrays have the chunks of ``act`` along N (one chunk = one shard) and are written by the
shard's one writer after ``act`` and before the shard's marker, which then records
``"pos_stats": true``. A shard whose marker lacks it (written before these arrays existed, or not
written) has no statistics: :func:`read_stats` says which rows have them, and the fit computes the
others from the positions.
"""

from __future__ import annotations

import numpy as np
import zarr

from sacv.io.zarr_store import ensure_array

STATS = ("pos_sum", "pos_sqsum", "pos_count")
MARKER_FLAG = "pos_stats"  # in a shard marker: this shard's statistics are written


def ensure_stats_arrays(root: zarr.Group, group: str, layer: str, n: int, channels: int, chunk_rows: int) -> None:
    """Create (or resize along N) the three statistics arrays of ``<group>/<layer>``."""
    ensure_array(root, f"{group}/{layer}/pos_sum", (n, channels), chunk_rows, "float64")
    ensure_array(root, f"{group}/{layer}/pos_sqsum", (n, channels), chunk_rows, "float64")
    ensure_array(root, f"{group}/{layer}/pos_count", (n,), chunk_rows, "int64")


def shard_stats(act: np.ndarray, dtype, blank: list[int]) -> dict[str, np.ndarray]:
    """Statistics of one shard's activations ``act`` (n, H, W, C) float32, as they are stored in
    ``dtype``: ``{"pos_sum": (n, C) float64, "pos_sqsum": (n, C) float64, "pos_count": (n,) int64}``.
    Rows in ``blank`` (no image) get zeros and count 0. One image at a time (bounded memory)."""
    n, h, w, c = act.shape
    sums, squares = np.zeros((n, c)), np.zeros((n, c))
    counts = np.full(n, h * w, np.int64)
    with np.errstate(over="ignore"):  # an overflow is reported by the write of `act` itself
        for i in range(n):
            x = act[i].astype(dtype, copy=False).astype(np.float64).reshape(h * w, c)
            sums[i], squares[i] = x.sum(axis=0), (x * x).sum(axis=0)
    sums[blank], squares[blank], counts[blank] = 0.0, 0.0, 0
    return {"pos_sum": sums, "pos_sqsum": squares, "pos_count": counts}


def has_stats(root: zarr.Group, group: str, layer: str) -> bool:
    return all(f"{group}/{layer}/{name}" in root for name in STATS)


def read_stats(
    root: zarr.Group, layer: str, rows: np.ndarray, shard_has_stats
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stored statistics of guidance store ``rows`` (sorted, distinct) of ``layer``.

    ``shard_has_stats(shard) -> bool`` says whether a shard's marker records them. Returns sums
    (n, C) float64, sums of squares (n, C) float64, counts (n,) int64 and ``have`` (n,) bool; rows
    without statistics (``have`` False) hold zeros. Reads only the chunks of rows that have them.
    """
    act = root[f"guidance/{layer}/act"]
    channels, step = act.shape[-1], act.chunks[0]
    rows = np.asarray(rows, np.int64)
    sums, squares = np.zeros((len(rows), channels)), np.zeros((len(rows), channels))
    counts = np.zeros(len(rows), np.int64)
    have = np.zeros(len(rows), bool)
    if has_stats(root, "guidance", layer):
        shards = rows // step
        have = np.isin(shards, [s for s in np.unique(shards) if shard_has_stats(int(s))])
    if have.any():
        take = rows[have]
        sums[have] = root[f"guidance/{layer}/pos_sum"].oindex[take]
        squares[have] = root[f"guidance/{layer}/pos_sqsum"].oindex[take]
        counts[have] = root[f"guidance/{layer}/pos_count"].oindex[take]
    return sums, squares, counts, have
