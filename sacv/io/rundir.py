"""A run directory (local path or fsspec URL): the one owner of every path under ``RUN/``.

Layout (docs/store.md, docs/architecture.md)::

    RUN/store.zarr/                  activations, gradients, vectors, maps (``store_uri``)
    RUN/tables/<name>.parquet        result tables (``read_table`` / ``write_table``; ``read_table_rows``: some rows)
    RUN/tables/audits.parquet        one row per audit (``read_audits`` / ``write_audits``)
    RUN/tables/history/<name>.parquet  tables of every audit, with audit_id (``read_history``)
    RUN/shards/<group>/<shard>.json  extraction done-markers (``read_shard_marker``, ``marked_shards``)
    RUN/shards/<group>/<shard>.rejects.json   images a shard could not decode (``read_shard_rejects``)
    RUN/fits/plan.json               the planned fit jobs (``read_fit_plan``)
    RUN/fits/<layer>/<key>.json      one cached fit result per job (``read_fit_result``)
    RUN/scores/<shard>.parquet|json  per-shard scores and their marker (``read_shard_scores``): the
                                     ``image_scores`` dataset (``tables/image_scores.json`` lists its files)
    RUN/score_sums/<shard>.parquet   a score shard's partial sums (``read_shard_aggregates``)
    RUN/score_top/<shard>.parquet    a score shard's extreme images (``read_shard_aggregates``)
    RUN/report/index.html            the static report (``write_report``)
    RUN/run.json                     config, versions, model identity, stage timings
    RUN/lock.json                    who runs on this directory now (``sacv.io.runlock``)

Every file is published whole (``sacv.io.storage.write_whole``: temporary name + rename on local disk,
one whole-object PUT on object stores, which have no rename), so a crash leaves either the old file
or the new one, never half of one. Markers are written after what they mark. No other module builds
a path under ``RUN/``.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import zarr

from sacv.io import parquet_parts, storage

DATASET_TABLES = {"image_scores": "scores"}  # tables kept as Parquet datasets: name -> folder of shard files
_TABLE_WRITES: dict[tuple[str, str], int] = {}  # (run uri, table) -> writes by this process (RunDir.table_stamp)


class RunDir:
    """``RUN/`` as in docs/store.md; every read returns ``None`` when the file does not exist yet."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        """``storage_options``: fsspec options for ``uri``; None = the process's options for its
        prefix (``sacv.io.storage.options_for``), ``{}`` for local paths."""
        self.uri = str(uri).rstrip("/")
        self.storage_options = storage.options_for(self.uri) if storage_options is None else dict(storage_options)
        self.fs, self.root = storage.url_to_fs(self.uri, self.storage_options)

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.fs)

    @property
    def store_uri(self) -> str:
        """The Zarr store: a plain path on local disk (also for ``file://`` URLs), else the URL."""
        base = self.root if self.is_local else self.uri
        return f"{base}/store.zarr"

    def open_store(self) -> zarr.Group | None:
        """The Zarr store opened read-only (``None`` when there is none yet)."""
        if not self._exists("store.zarr"):
            return None
        return self.open_zarr("r")

    def open_zarr(self, mode: str = "r"):
        """The Zarr root group (zarr's fsspec store with ``storage_options`` for a URL)."""
        return zarr.open_group(self.store_uri, mode=mode, storage_options=self.zarr_options)

    @property
    def zarr_options(self) -> dict | None:
        """``storage_options`` as zarr takes them (None for a local path or no options)."""
        return None if self.is_local else (self.storage_options or None)

    def store_bytes(self) -> int:
        """Bytes of every file under ``store.zarr/`` (0 when there is no store)."""
        if not self._exists("store.zarr"):
            return 0
        return int(self.fs.du(self._path("store.zarr"), total=True))

    def is_run(self) -> bool:
        """Whether ``RUN/`` holds a run record or tables (a run directory at all)."""
        return self._exists("run.json") or self._exists("tables")

    # --- bytes and JSON (private: callers name what they read, not where it lies) -----------------

    def _path(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    def _exists(self, relpath: str) -> bool:
        return self.fs.exists(self._path(relpath))

    def _remove(self, relpath: str) -> None:
        try:
            self.fs.rm_file(self._path(relpath))
        except FileNotFoundError:
            pass

    def _write_bytes(self, relpath: str, data: bytes) -> None:
        storage.write_whole(self.fs, self._path(relpath), data)

    def _write_json(self, relpath: str, obj: dict) -> None:
        self._write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def _read_json(self, relpath: str) -> dict | None:
        if not self._exists(relpath):
            return None
        return json.loads(self.fs.cat_file(self._path(relpath)))

    def _write_parquet(self, relpath: str, table: pd.DataFrame) -> None:
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        self._write_bytes(relpath, buffer.getvalue())

    def _read_parquet(self, relpath: str, columns: list[str] | None = None) -> pd.DataFrame | None:
        if not self._exists(relpath):
            return None
        if columns is not None:  # ranged reads of those column chunks alone
            import pyarrow.parquet as pq

            return pq.read_table(self._path(relpath), filesystem=self.fs, columns=columns).to_pandas()
        return pd.read_parquet(io.BytesIO(self.fs.cat_file(self._path(relpath))))

    # --- tables ----------------------------------------------------------------------------------

    def _table_file(self, name: str) -> str:
        """The file that stands for table ``name``: the Parquet file, or a dataset's file list."""
        return f"tables/{name}.json" if name in DATASET_TABLES else f"tables/{name}.parquet"

    def table_uri(self, name: str) -> str:
        """Where table ``name`` is: its Parquet file, or a glob of a dataset's files."""
        if name in DATASET_TABLES:
            return f"{self.uri}/{DATASET_TABLES[name]}/*.parquet"
        return f"{self.uri}/tables/{name}.parquet"

    def table_stamp(self, name: str) -> str | None:
        """``"<size>:<modified>:<etag>:<writes>"`` of table ``name``'s file, ``writes`` counting this
        process's writes of it (a coarse clock cannot hide those); None when it is missing or the
        file system gives neither a modification time nor an ETag."""
        try:
            info = self.fs.info(self._path(self._table_file(name)))
        except FileNotFoundError:
            return None
        modified, etag = info.get("mtime") or info.get("LastModified"), info.get("ETag")
        if modified is None and etag is None:
            return None
        return f"{info.get('size')}:{modified}:{etag}:{_TABLE_WRITES.get((self.uri, name), 0)}"

    def write_table(
        self,
        name: str,
        table: pd.DataFrame,
        row_group_size: int | None = None,
        split_by: str | None = None,
        statistics: list[str] | None = None,
    ) -> str:
        """Write ``tables/<name>.parquet`` whole; return its URI. With ``row_group_size``: row
        groups of at most that many rows, a new one wherever the value of ``split_by`` changes (the
        table sorted by it), min/max statistics of the ``statistics`` columns only (for
        :meth:`read_table_rows`)."""
        relpath = f"tables/{name}.parquet"
        if row_group_size is None:
            self._write_parquet(relpath, table)
        else:
            self._write_bytes(relpath, parquet_parts.in_row_groups(table, row_group_size, split_by, statistics))
        return self._wrote_table(name)

    def _wrote_table(self, name: str) -> str:
        """Count a write of table ``name`` by this process (``table_stamp``); return its URI."""
        _TABLE_WRITES[self.uri, name] = _TABLE_WRITES.get((self.uri, name), 0) + 1
        return self.table_uri(name)

    def table_files(self, name: str) -> list[str]:
        """File-system paths (``self.fs``) of table ``name``'s Parquet files: one, or a dataset's
        files as its last build listed them; empty when the table does not exist."""
        if name in DATASET_TABLES:
            listing = self._read_json(self._table_file(name))
            if listing is not None:
                return [self._path(f) for f in listing["files"]]
            legacy = f"tables/{name}.parquet"  # one file, as runs scored by earlier versions wrote it
            return [self._path(legacy)] if self._exists(legacy) else []
        return [self._path(self._table_file(name))] if self._exists(self._table_file(name)) else []

    def dataset(self, name: str):
        """Table ``name`` as a ``pyarrow.dataset.Dataset`` (lazy: filters and column choices are
        pushed down to the files); None when the table does not exist."""
        import pyarrow.dataset as ds
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        files = self.table_files(name)
        return ds.dataset(files, format="parquet", filesystem=PyFileSystem(FSSpecHandler(self.fs))) if files else None

    def read_table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame | None:
        """Table ``name`` in memory, every row (a dataset's files concatenated: see ``dataset`` for a
        scan), with only ``columns`` when given (None: all)."""
        if name in DATASET_TABLES:
            dataset = self.dataset(name)
            return None if dataset is None else dataset.to_table(columns=columns).to_pandas()
        return self._read_parquet(self._table_file(name), columns)

    def write_score_dataset(self, shards: list[int], rows: int) -> str:
        """List the ``image_scores`` dataset's files (``shards``' score files, ``rows`` rows in all),
        then remove the single file earlier versions wrote."""
        files = [f"scores/{shard:06d}.parquet" for shard in shards]
        self._write_json(self._table_file("image_scores"), {"files": files, "rows": rows})
        self._remove("tables/image_scores.parquet")
        return self._wrote_table("image_scores")

    def forget_score_tables(self) -> None:
        """Remove the tables that name store rows of scored images (the dataset listing and the
        extreme images), e.g. once compaction moves rows: the next score stage writes them again."""
        self._remove(self._table_file("image_scores"))
        self._remove("tables/top_images.parquet")

    def read_table_rows(self, name: str, where: dict[str, list]) -> pd.DataFrame | None:
        """The rows of ``tables/<name>.parquet`` whose value in each column of ``where`` is one of
        the values listed, as :meth:`read_table` gives them (same columns and dtypes; index = the
        row's position in the file); None when the file is missing.

        Only the footer and the row groups whose min/max statistics admit a listed value in every
        column of ``where`` are fetched (ranged reads, no read-ahead; a row group without statistics
        for a column is read): a table sorted by those columns in bounded row groups is read in part.
        """
        try:
            file = self.fs.open(self._path(f"tables/{name}.parquet"), "rb", cache_type="none")
        except FileNotFoundError:
            return None
        with file:
            return parquet_parts.read_matching(file, where)

    def table_names(self) -> list[str]:
        """Names of the tables under ``tables/`` (datasets included), sorted."""
        if not self._exists("tables"):
            return []
        files = [f.rsplit("/", 1)[-1] for f in self.fs.ls(self._path("tables"), detail=False)]
        names = {f[: -len(".parquet")] for f in files if f.endswith(".parquet")}
        return sorted(names | {name for name in DATASET_TABLES if f"{name}.json" in files})

    def read_audits(self) -> pd.DataFrame | None:
        return self.read_table("audits")

    def write_audits(self, table: pd.DataFrame) -> str:
        """Write ``tables/audits.parquet`` whole (the commit of an audit: written after its history)."""
        return self.write_table("audits", table)

    def history_uri(self, name: str) -> str:
        return f"{self.uri}/tables/history/{name}.parquet"

    def read_history(self, name: str) -> pd.DataFrame | None:
        return self._read_parquet(f"tables/history/{name}.parquet")

    def write_history(self, name: str, table: pd.DataFrame) -> str:
        """Write ``tables/history/<name>.parquet`` whole (every audit's rows, with ``audit_id``)."""
        self._write_parquet(f"tables/history/{name}.parquet", table)
        return self.history_uri(name)

    def write_report(self, page: str) -> str:
        """Write ``report/index.html``; return its URI."""
        self._write_bytes("report/index.html", page.encode("utf-8"))
        return f"{self.uri}/report/index.html"

    # --- run record ------------------------------------------------------------------------------

    def read_run_record(self) -> dict | None:
        return self._read_json("run.json")

    def update_run_record(self, **fields) -> dict:
        """Merge ``fields`` into run.json (dicts are merged one level deep)."""
        record = self.read_run_record() or {}
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(record.get(key), dict):
                record[key] = {**record[key], **value}
            else:
                record[key] = value
        self._write_json("run.json", record)
        return record

    # --- extraction markers ----------------------------------------------------------------------

    def read_shard_marker(self, group: str, shard: int) -> dict | None:
        return self._read_json(f"shards/{group}/{shard:06d}.json")

    def write_shard_marker(self, group: str, shard: int, marker: dict) -> None:
        """Written after all of the shard's arrays: its presence means the shard is done."""
        self._write_json(f"shards/{group}/{shard:06d}.json", marker)

    def write_shard_rejects(self, group: str, shard: int, rejects: list[dict]) -> None:
        """The images the shard could not decode (written before its marker); none: no file."""
        relpath = f"shards/{group}/{shard:06d}.rejects.json"
        if rejects:
            self._write_json(relpath, {"rejects": rejects})
        else:
            self._remove(relpath)  # one found by an earlier run of the shard

    def remove_shard_marker(self, group: str, shard: int) -> None:
        """The shard is no longer done: its marker first, then its rejects file."""
        self._remove(f"shards/{group}/{shard:06d}.json")
        self._remove(f"shards/{group}/{shard:06d}.rejects.json")

    def marked_shards(self, group: str) -> list[int]:
        """Shards of ``group`` with a done-marker, ascending."""
        if not self._exists(f"shards/{group}"):
            return []
        names = (p.rsplit("/", 1)[-1] for p in self.fs.glob(self._path(f"shards/{group}/*.json")))
        return sorted(int(n[: -len(".json")]) for n in names if n[: -len(".json")].isdigit())

    def read_shard_rejects(self) -> list[dict]:
        """Every shard's decode rejects, over all groups (one listing of ``shards/``)."""
        if not self._exists("shards"):
            return []
        found = sorted(self.fs.glob(self._path("shards/*/*.rejects.json")))
        return [r for path in found for r in json.loads(self.fs.cat_file(path))["rejects"]]

    # --- the planning scan -------------------------------------------------------------------------

    def write_scan_part(self, name: str, table: pd.DataFrame) -> None:
        """A part of the planning scan (``candidates``, or ``checked-<k>`` of check batch k)."""
        self._write_parquet(f"scan/{name}.parquet", table)

    def read_scan_part(self, name: str) -> pd.DataFrame:
        table = self._read_parquet(f"scan/{name}.parquet")
        if table is None:
            raise FileNotFoundError(f"{self._path(f'scan/{name}.parquet')} is missing; plan the extraction again")
        return table

    # --- fits ------------------------------------------------------------------------------------

    def read_fit_plan(self) -> list[dict] | None:
        plan = self._read_json("fits/plan.json")
        return None if plan is None else plan["jobs"]

    def write_fit_plan(self, jobs: list[dict]) -> None:
        self._write_json("fits/plan.json", {"jobs": jobs})

    def has_fit_result(self, layer: str, key: str) -> bool:
        return self._exists(f"fits/{layer}/{key}.json")

    def read_fit_result(self, layer: str, key: str) -> dict | None:
        return self._read_json(f"fits/{layer}/{key}.json")

    def write_fit_result(self, layer: str, key: str, result: dict) -> None:
        self._write_json(f"fits/{layer}/{key}.json", result)

    # --- per-shard scores ------------------------------------------------------------------------

    def read_shard_scores(self, shard: int) -> pd.DataFrame | None:
        return self._read_parquet(f"scores/{shard:06d}.parquet")

    def read_shard_aggregates(self, shard: int):
        """A score shard's (partial sums, extreme images) as pyarrow tables; None when it has none."""
        import pyarrow.parquet as pq

        try:
            return tuple(
                pq.read_table(self._path(f"{folder}/{shard:06d}.parquet"), filesystem=self.fs)
                for folder in ("score_sums", "score_top")
            )
        except FileNotFoundError:
            return None

    def write_shard_aggregates(self, shard: int, sums: pd.DataFrame, top: pd.DataFrame) -> None:
        self._write_parquet(f"score_sums/{shard:06d}.parquet", sums)
        self._write_parquet(f"score_top/{shard:06d}.parquet", top)

    def write_shard_scores(
        self, shard: int, table: pd.DataFrame, key: str, sums: pd.DataFrame, top: pd.DataFrame
    ) -> None:
        """The shard's scores and their aggregates (``sacv.score.tables``), then its marker with the
        content ``key`` (marker last)."""
        self._write_parquet(f"scores/{shard:06d}.parquet", table)
        self.write_shard_aggregates(shard, sums, top)
        self._write_json(f"scores/{shard:06d}.json", {"key": key, "rows": len(table)})

    def remove_shard_scores(self, shard: int) -> None:
        """Forget a shard's scores: its marker first, then the scores and their aggregates."""
        self._remove(f"scores/{shard:06d}.json")
        for folder in ("scores", "score_sums", "score_top"):
            self._remove(f"{folder}/{shard:06d}.parquet")

    def scored_shards(self) -> list[int]:
        """Dataset shards with a scores file or marker, ascending."""
        if not self._exists("scores"):
            return []
        names = {p.rsplit("/", 1)[-1].split(".")[0] for p in self.fs.ls(self._path("scores"), detail=False)}
        return sorted(int(n) for n in names if n.isdigit())

    def shard_scores_key(self, shard: int) -> str | None:
        """The content key recorded when the shard's scores were written (None: not scored)."""
        return (self._read_json(f"scores/{shard:06d}.json") or {}).get("key")

    # --- run lock (sacv.io.runlock) -----------------------------------------------------------------

    @property
    def lock_uri(self) -> str:
        return f"{self.uri}/lock.json"

    def read_lock(self) -> dict | None:
        """The lock record, or None when there is none (or it is being replaced right now)."""
        try:
            return json.loads(self.fs.cat_file(self._path("lock.json")))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_lock(self, record: dict) -> None:
        """Overwrite the lock record (the holder's heartbeat)."""
        self._write_json("lock.json", record)

    def remove_lock(self) -> None:
        self._remove("lock.json")

    def create_lock(self, record: dict) -> bool:
        """Create ``lock.json`` only if absent (``sacv.io.storage.create_whole``); True when this call did."""
        data = json.dumps(record, indent=2, sort_keys=True).encode()
        return storage.create_whole(self.fs, self._path("lock.json"), data)
