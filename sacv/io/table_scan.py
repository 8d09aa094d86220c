"""Tables read by engine, with column choices and equality filters pushed down to the files.

A table is one Parquet file or, for ``image_scores``, a Parquet dataset of one file per score shard
(``RunDir.dataset``). Every engine but pandas is lazy: nothing is read until the caller asks.

| engine    | returns                         | reads                                   |
|-----------|---------------------------------|-----------------------------------------|
| `pandas`  | `pandas.DataFrame`              | the matching rows, now                  |
| `pyarrow` | `pyarrow.dataset.Dataset`       | on `to_table()` / `scanner()`           |
| `duckdb`  | `duckdb.DuckDBPyRelation`       | on `df()`, `fetchall()`, ... (SQL on it) |
| `polars`  | `polars.LazyFrame`              | on `collect()`                          |
| `dask`    | `dask.dataframe.DataFrame`      | on `compute()`, a partition per file    |
"""

from __future__ import annotations

import difflib

ENGINES = ("pandas", "pyarrow", "duckdb", "polars", "dask")


def _expression(where: dict, names: list[str]):
    """A pyarrow expression: every ``column == value`` (``column in values`` for a list) of ``where``."""
    import pyarrow.dataset as ds

    expression = None
    for column, value in where.items():
        if column not in names:
            close = difflib.get_close_matches(column, names, n=3)
            raise KeyError(f"no column {column!r} to filter on; columns: {names} (close: {close})")
        term = ds.field(column).isin(value) if isinstance(value, (list, tuple, set)) else ds.field(column) == value
        expression = term if expression is None else expression & term
    return expression


def scan(dataset, files: list[str], fs, engine: str, columns: list[str] | None, where: dict):
    """``dataset`` (a ``pyarrow.dataset.Dataset`` over ``files`` on the fsspec file system ``fs``)
    through ``engine`` (module docstring), keeping ``columns`` (None: all) and the rows matching
    ``where`` ({column: value or list of values})."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    expression = _expression(where, dataset.schema.names)
    if engine == "pandas":
        return dataset.to_table(columns=columns, filter=expression).to_pandas()
    selected = dataset if expression is None else dataset.filter(expression)
    if engine == "pyarrow":
        return selected
    try:
        module = __import__(f"{engine}.dataframe" if engine == "dask" else engine)
    except ImportError:
        raise ImportError(f"engine={engine!r} needs the {engine} package: pip install 'sacv[{engine}]'") from None
    if engine == "dask":
        filters = [(c, "in", list(v)) if isinstance(v, (list, tuple, set)) else (c, "==", v) for c, v in where.items()]
        return module.dataframe.read_parquet(files, filesystem=fs, columns=columns, filters=filters or None)
    if engine == "duckdb":
        relation = module.from_arrow(selected)
        return relation if columns is None else relation.project(", ".join(f'"{c}"' for c in columns))
    frame = module.scan_pyarrow_dataset(selected)  # polars
    return frame if columns is None else frame.select(columns)
