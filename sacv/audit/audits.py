"""Audits: every ``sacv run`` over a run directory is one audit with an id, recorded in a history.

- ``tables/audits.parquet``: one row per audit (``AUDIT_COLUMNS``), appended when it ends;
- ``tables/history/contributions.parquet``: the contributions table of every finished audit with
  its ``audit_id``; ``tables/history/per_set.parquet``: the per-random-set scores behind it (what
  drift tests need);
- ``tables/drift.parquet``: the latest audit against the previous one (or ``audit.baseline``),
  see ``sacv.audit.drift``; ``tables/checks.parquet``: the config's policy checks (``sacv.audit.policy``).

Appending rewrites each table whole (``RunDir`` writes are atomic), history first and the audit row
last: the audit row commits the audit. History rows of an audit without a ``done`` row (a crash
between the writes) are never read and are dropped by the next append.
"""

from __future__ import annotations

import difflib
import hashlib
import time
import uuid

import pandas as pd

from sacv.audit.drift import drift_table
from sacv.config import RunConfig
from sacv.errors import InputError
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import class_names_of

AUDIT_COLUMNS = [
    "audit_id",
    "started",
    "finished",
    "status",
    "config_hash",
    "model_spec",
    "weight_hash",
    "images_added",
    "images_removed",
    "images_total",
    "shards_run",
    "images_extracted",
    "checks_failed",
    "message",
]


def new_audit_id() -> str:
    """A sortable, unique id: UTC time to the second plus 6 random hex digits, e.g. ``20260101T020000Z-3f2a1c``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def config_hash(config: RunConfig) -> str:
    """16 hex digits of the sha256 of the config (JSON, sorted keys)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def done_audits(run: RunDir) -> pd.DataFrame:
    """The audits table (empty with ``AUDIT_COLUMNS`` when none), oldest first."""
    table = run.read_audits()
    return pd.DataFrame(columns=AUDIT_COLUMNS) if table is None else table


def history(run: RunDir, name: str) -> pd.DataFrame | None:
    """``tables/history/<name>.parquet`` restricted to committed audits (a ``done`` row), oldest first."""
    table = run.read_history(name)
    if table is None:
        return None
    audits = done_audits(run)
    return table[table["audit_id"].isin(audits.loc[audits["status"] == "done", "audit_id"])].reset_index(drop=True)


def _append_history(run: RunDir, name: str, audit_id: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Append ``rows`` under ``audit_id`` to a history table (dropping uncommitted rows); return the new rows."""
    rows = rows.assign(audit_id=audit_id)[["audit_id", *rows.columns]]
    old = history(run, name)
    run.write_history(name, rows if old is None or old.empty else pd.concat([old, rows], ignore_index=True))
    return rows


def record_audit(
    run_uri: str,
    audit_id: str,
    started: float,
    config: RunConfig,
    extract=None,
    status: str = "done",
    message: str | None = None,
    scored: bool = False,
) -> pd.DataFrame | None:
    """Commit one audit: when it is ``done`` and ``scored`` (its score stage built the tables),
    append the contributions table and its per-set scores to the history, write the drift table
    and evaluate the config's checks (``tables/checks.parquet``); then append the audit row (last).
    ``started``: epoch seconds; ``extract``: the audit's ``ExtractSummary`` (None when extraction
    failed); ``status``: done | failed. Returns the checks table (None when none were evaluated)."""
    from sacv.audit.policy import run_checks

    run = RunDir(run_uri)
    checks = None
    if status == "done" and scored:
        contributions = run.read_table("contributions")
        _append_history(run, "contributions", audit_id, contributions)
        current = _append_history(run, "per_set", audit_id, run.read_table("per_set"))
        write_drift(run, config, current)
        if config.checks:
            checks = run_checks(run_uri, config)
    model = (run.read_run_record() or {}).get("model", {})
    row = {
        "audit_id": audit_id,
        "started": pd.Timestamp(started, unit="s", tz="UTC"),
        "finished": pd.Timestamp.now(tz="UTC"),
        "status": status,
        "config_hash": config_hash(config),
        "model_spec": model.get("spec", config.model.spec),
        "weight_hash": model.get("weight_hash"),
        "images_added": getattr(extract, "added", None),
        "images_removed": getattr(extract, "removed", None),
        "images_total": getattr(extract, "images", None),
        "shards_run": getattr(extract, "shards_run", None),
        "images_extracted": getattr(extract, "images_extracted", None),
        "checks_failed": None if checks is None else int((~checks["passed"]).sum()),
        "message": message,
    }
    audits = done_audits(run)
    table = (
        pd.DataFrame([row], columns=AUDIT_COLUMNS)
        if audits.empty
        else pd.concat([audits, pd.DataFrame([row])], ignore_index=True)
    )
    for column in ("images_added", "images_removed", "images_total", "shards_run", "images_extracted", "checks_failed"):
        table[column] = table[column].astype("Int64")
    run.write_audits(table[AUDIT_COLUMNS])
    return checks


def baseline_audit(run: RunDir, baseline: str | None) -> str | None:
    """The audit drift compares with: ``baseline`` (checked) or the latest done audit with scores."""
    per_set = history(run, "per_set")
    known = [] if per_set is None else list(dict.fromkeys(per_set["audit_id"]))
    if baseline is None:
        return known[-1] if known else None
    if baseline not in known:
        close = difflib.get_close_matches(baseline, known, n=3, cutoff=0.3)
        raise InputError(
            f"audit.baseline {baseline!r} is not a finished audit with scores in {run.uri}; "
            f"close audit ids: {close} (see `sacv history {run.uri}`)"
        )
    return baseline


def write_drift(run: RunDir, config: RunConfig, current: pd.DataFrame) -> pd.DataFrame:
    """``tables/drift.parquet``: the audit of ``current`` (its per-set rows) against its baseline
    (``audit.baseline`` or the previous audit); an empty table when there is none yet."""
    audit_id = current["audit_id"].iloc[0]
    baseline = baseline_audit(run, config.audit.baseline)
    before = history(run, "per_set")
    before = before[before["audit_id"] == baseline] if baseline else current.iloc[:0]
    table = drift_table(
        before,
        current,
        class_names_of(run.store_uri),
        config.score.alpha,
        config.score.correction,
        labels=(baseline or "", audit_id),
        statistic=config.score.statistic,
    )
    run.write_table("drift", table)
    return table


def describe_audits(run_uri: str) -> str:
    """The audits of a run directory as text, one line each (``sacv history``)."""
    audits = done_audits(RunDir(run_uri))
    if audits.empty:
        return f"{run_uri}: no audits yet (each `sacv run` records one)"
    shown = audits.assign(
        started=audits["started"].dt.strftime("%Y-%m-%d %H:%M:%S"),
        seconds=(audits["finished"] - audits["started"]).dt.total_seconds().round(1),
        weight_hash=audits["weight_hash"].str[:12],
    )
    columns = [
        "audit_id",
        "started",
        "seconds",
        "status",
        "images_total",
        "images_added",
        "images_removed",
        "shards_run",
        "checks_failed",
        "config_hash",
        "weight_hash",
        "message",
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        return shown[columns].to_string(index=False)
