"""A run directory (local path or fsspec URL): the one owner of every path under ``RUN/``.

Layout (docs/store.md, docs/architecture.md)::

    RUN/store.zarr/                  activations, gradients, vectors, maps (``store_uri``)
    RUN/tables/<name>.parquet        result tables (``read_table`` / ``write_table``)
    RUN/tables/audits.parquet        one row per audit (``read_audits`` / ``write_audits``)
    RUN/tables/history/<name>.parquet  tables of every audit, with audit_id (``read_history``)
    RUN/shards/<group>/<shard>.json  extraction done-markers (``read_shard_marker``)
    RUN/fits/plan.json               the planned fit jobs (``read_fit_plan``)
    RUN/fits/<layer>/<key>.json      one cached fit result per job (``read_fit_result``)
    RUN/scores/<shard>.parquet|json  per-shard scores and their marker (``read_shard_scores``)
    RUN/report/index.html            the static report (``write_report``)
    RUN/run.json                     config, versions, model identity, stage timings

Every file is written to a temporary name and then moved into place, so a crash leaves either the
old file or the new one, never half of one. No other module builds a path under ``RUN/``.
"""

from __future__ import annotations

import io
import json
import uuid

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem


class RunDir:
    """``RUN/`` as in docs/store.md; every read returns ``None`` when the file does not exist yet."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    @property
    def store_uri(self) -> str:
        """The Zarr store: a plain path on local disk (also for ``file://`` URLs), else the URL."""
        base = self.root if isinstance(self.fs, LocalFileSystem) else self.uri
        return f"{base}/store.zarr"

    def is_run(self) -> bool:
        """Whether ``RUN/`` holds a run record or tables (a run directory at all)."""
        return self._exists("run.json") or self._exists("tables")

    # --- bytes and JSON (private: callers name what they read, not where it lies) -----------------

    def _path(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    def _exists(self, relpath: str) -> bool:
        return self.fs.exists(self._path(relpath))

    def _write_bytes(self, relpath: str, data: bytes) -> None:
        target = self._path(relpath)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(temporary, data)
        self.fs.mv(temporary, target)

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

    def _read_parquet(self, relpath: str) -> pd.DataFrame | None:
        if not self._exists(relpath):
            return None
        return pd.read_parquet(io.BytesIO(self.fs.cat_file(self._path(relpath))))

    # --- tables ----------------------------------------------------------------------------------

    def table_uri(self, name: str) -> str:
        return f"{self.uri}/tables/{name}.parquet"

    def write_table(self, name: str, table: pd.DataFrame) -> str:
        """Write ``tables/<name>.parquet`` whole; return its URI."""
        self._write_parquet(f"tables/{name}.parquet", table)
        return self.table_uri(name)

    def read_table(self, name: str) -> pd.DataFrame | None:
        return self._read_parquet(f"tables/{name}.parquet")

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

    def write_shard_scores(self, shard: int, table: pd.DataFrame, key: str) -> None:
        """The shard's scores, then its marker with the content ``key`` (marker last)."""
        self._write_parquet(f"scores/{shard:06d}.parquet", table)
        self._write_json(f"scores/{shard:06d}.json", {"key": key, "rows": len(table)})

    def shard_scores_key(self, shard: int) -> str | None:
        """The content key recorded when the shard's scores were written (None: not scored)."""
        return (self._read_json(f"scores/{shard:06d}.json") or {}).get("key")
