"""A run directory (local path or fsspec URL): tables, JSON records and shard markers.

Every file is written to a temporary name and then moved into place, so a crash leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import uuid

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem


class RunDir:
    """``RUN/`` as in docs/store.md: ``store.zarr/``, ``tables/*.parquet``, ``shards/``, ``run.json``."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    @property
    def store_uri(self) -> str:
        """The Zarr store: a plain path on local disk (also for ``file://`` URLs), else the URL."""
        base = self.root if isinstance(self.fs, LocalFileSystem) else self.uri
        return f"{base}/store.zarr"

    def _path(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self._path(relpath))

    def write_bytes(self, relpath: str, data: bytes) -> None:
        target = self._path(relpath)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(temporary, data)
        self.fs.mv(temporary, target)

    def write_json(self, relpath: str, obj: dict) -> None:
        self.write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, relpath: str) -> dict | None:
        if not self.exists(relpath):
            return None
        return json.loads(self.fs.cat_file(self._path(relpath)))

    def write_table(self, name: str, table: pd.DataFrame) -> str:
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        self.write_bytes(f"tables/{name}.parquet", buffer.getvalue())
        return f"{self.uri}/tables/{name}.parquet"

    def read_table(self, name: str) -> pd.DataFrame | None:
        relpath = f"tables/{name}.parquet"
        if not self.exists(relpath):
            return None
        return pd.read_parquet(io.BytesIO(self.fs.cat_file(self._path(relpath))))

    def marker_path(self, group: str, shard: int) -> str:
        return f"shards/{group}/{shard:06d}.json"

    def update_run_record(self, **fields) -> dict:
        """Merge ``fields`` into run.json (dicts are merged one level deep)."""
        record = self.read_json("run.json") or {}
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(record.get(key), dict):
                record[key] = {**record[key], **value}
            else:
                record[key] = value
        self.write_json("run.json", record)
        return record
