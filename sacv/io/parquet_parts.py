"""Parquet files read in part: written in bounded row groups with min/max statistics, read back by
the row groups whose statistics admit the rows wanted (``RunDir.write_table`` / ``read_table_rows``)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def in_row_groups(table: pd.DataFrame, size: int, split_by: str | None, statistics: list[str] | None) -> bytes:
    """``table`` as Parquet bytes (what ``to_parquet(index=False)`` writes) in row groups of at
    most ``size`` rows, cut also where ``split_by`` changes; statistics of ``statistics`` columns."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    cuts = [0, len(table)]
    if split_by is not None and len(table):
        values = table[split_by].to_numpy()
        cuts = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist(), len(table)]
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, arrow.schema, write_statistics=statistics or True) as writer:
        for start, stop in zip(cuts[:-1], cuts[1:]):
            writer.write_table(arrow.slice(start, stop - start), row_group_size=size)
    return buffer.getvalue()


def admits(row_group: pq.RowGroupMetaData, where: dict[str, list]) -> bool:
    """Whether the row group's min/max statistics admit one of the listed values of every column
    of ``where`` (a column without statistics admits all)."""
    for j in range(row_group.num_columns):
        chunk = row_group.column(j)
        values, stats = where.get(chunk.path_in_schema), chunk.statistics
        if values is None or stats is None or not stats.has_min_max:
            continue
        if not any(stats.min <= value <= stats.max for value in values):
            return False
    return True


def read_matching(file, where: dict[str, list]) -> pd.DataFrame:
    """The rows of the Parquet ``file`` (a seekable binary file) whose value in each column of
    ``where`` is one of the values listed, as ``pd.read_parquet`` gives them (index = the row's
    position in the file), reading the footer and only the row groups that :func:`admits`."""
    parquet = pq.ParquetFile(file, pre_buffer=True)  # one coalesced read per row group
    meta = parquet.metadata
    starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    chosen = [i for i in range(meta.num_row_groups) if admits(meta.row_group(i), where)]
    frame = parquet.read_row_groups(chosen).to_pandas()
    frame.index = pd.RangeIndex(0).append([pd.RangeIndex(starts[i], starts[i + 1]) for i in chosen])
    keep = np.ones(len(frame), dtype=bool)
    for column, values in where.items():
        keep &= frame[column].isin(values).to_numpy(dtype=bool)
    return frame[keep]
