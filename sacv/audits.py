"""Audits: every ``sacv run`` over a run directory is one audit with an id, recorded in a history.

- ``tables/audits.parquet``: one row per audit (``AUDIT_COLUMNS``), appended when it ends;
- ``tables/history/contributions.parquet``: the contributions table of every finished audit with
  its ``audit_id``; ``tables/history/per_set.parquet``: the per-random-set scores behind it (what
  drift tests need).

Appending rewrites each table whole (``RunDir`` writes are atomic), history first and the audit row
last: the audit row commits the audit. History rows of an audit without a ``done`` row (a crash
between the writes) are never read and are dropped by the next append.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import pandas as pd

from sacv.config import RunConfig
from sacv.rundir import RunDir

AUDIT_COLUMNS = [
    "audit_id", "started", "finished", "status", "config_hash", "model_spec", "weight_hash",
    "images_added", "images_removed", "images_total", "shards_run", "images_extracted", "message",
]


def new_audit_id() -> str:
    """A sortable, unique id: UTC time to the second plus 6 random hex digits, e.g. ``20260101T020000Z-3f2a1c``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def config_hash(config: RunConfig) -> str:
    """16 hex digits of the sha256 of the config (JSON, sorted keys)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
