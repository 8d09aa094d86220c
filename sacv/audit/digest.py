"""An audit in a few rows and lines, for people who read it in an orchestrator (``tasks/publish.py``
turns it into Prefect artifacts and an event).

``run_slug`` names a run directory in keys: ``sacv-<its last two path parts>-<8 hex of its URI's
sha256>``, lowercase letters, digits and dashes only, so each config (run directory) keeps its own
history of artifacts. ``audit_digest`` reads the run directory's latest audit: the top contributions,
the significant drift rows, the failed policy checks, and a markdown summary (counts, what changed
since the previous audit, the time per stage).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import pandas as pd

from sacv.audit.audits import done_audits, history
from sacv.io.rundir import RunDir

TOP_ROWS = 20  # top contributions shown
MAX_ROWS = 50  # drift and failed-check rows shown
ALERT_ROWS = 10  # failing rows carried by an alert
CONTRIBUTION_COLUMNS = [
    "layer",
    "concept",
    "class_name",
    "n_images",
    "spatial_score",
    "tcav_score",
    "z",
    "p_adjusted",
    "significant",
]
DRIFT_COLUMNS = ["layer", "concept", "class_name", "change", "spatial_change", "tcav_change", "z", "p_adjusted"]
CHECK_COLUMNS = ["check", "row", "value", "threshold"]
ROW_KEY = ["layer", "concept", "class_name"]


def run_slug(run_uri: str) -> str:
    """A stable key for a run directory (module docstring), e.g. ``sacv-audits-zebra-1f2e3d4c``."""
    uri = run_uri.rstrip("/")
    parts = [p for p in re.split(r"[/\\]+", uri.split("://")[-1]) if p][-2:]
    words = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return f"sacv-{words}-{digest}" if words else f"sacv-{digest}"


@dataclass(frozen=True)
class AuditDigest:
    """The latest audit of a run directory; rows are JSON-ready dicts."""

    run_dir: str
    slug: str
    audit_id: str | None
    top: list[dict]
    drift: list[dict]  # significant drift rows, largest change first
    failed_checks: list[dict]
    markdown: str

    @property
    def alert(self) -> bool:
        """Whether policy checks failed or drift is significant."""
        return bool(self.failed_checks or self.drift)

    def alert_payload(self) -> dict:
        """What an alert carries: the run directory, the audit and its first failing rows."""
        return {
            "run_dir": self.run_dir,
            "audit_id": self.audit_id,
            "failed_checks": self.failed_checks[:ALERT_ROWS],
            "drift": self.drift[:ALERT_ROWS],
        }


def records(table: pd.DataFrame | None, columns: list[str], rows: int) -> list[dict]:
    """The first ``rows`` rows as dicts of plain values (missing -> None)."""
    if table is None or table.empty:
        return []
    part = table[columns].head(rows).astype(object)
    return part.where(pd.notna(part), None).to_dict("records")


def audit_digest(run_uri: str, report_uri: str | None = None) -> AuditDigest:
    """The digest of the latest audit of ``run_uri`` (module docstring); ``report_uri``: the report
    built for it, linked from the summary."""
    run = RunDir(run_uri)
    audits = done_audits(run)
    contributions, drift, checks = (run.read_table(name) for name in ("contributions", "drift", "checks"))
    top = None
    if contributions is not None:
        top = contributions.assign(_z=contributions["z"].abs()).sort_values(["significant", "_z"], ascending=False)
    latest = None if audits.empty else audits.iloc[-1]
    if drift is not None and (latest is None or not (drift["after"] == latest["audit_id"]).all()):
        drift = None  # an older audit's drift: this audit was not scored
    if latest is None or pd.isna(latest["checks_failed"]):
        checks = None  # this audit evaluated no checks: the table on disk is an older audit's
    drifting = None if drift is None else drift[drift["significant"]]
    failed = None if checks is None else checks[~checks["passed"]]
    return AuditDigest(
        run_dir=run.uri,
        slug=run_slug(run.uri),
        audit_id=None if audits.empty else str(audits["audit_id"].iloc[-1]),
        top=records(top, CONTRIBUTION_COLUMNS, TOP_ROWS),
        drift=records(drifting, DRIFT_COLUMNS, MAX_ROWS),
        failed_checks=records(failed, CHECK_COLUMNS, MAX_ROWS),
        markdown="\n".join(_summary(run, audits, contributions, drifting, failed, report_uri)) + "\n",
    )


def _significant(table: pd.DataFrame | None) -> set[tuple]:
    if table is None or table.empty:
        return set()
    return set(table.loc[table["significant"], ROW_KEY].itertuples(index=False, name=None))


def _summary(run: RunDir, audits, contributions, drifting, failed, report_uri) -> list[str]:
    latest = None if audits.empty else audits.iloc[-1]
    lines = [f"# SACV audit of `{run.uri}`", ""]
    if latest is None:
        return lines + ["No audit recorded yet."]
    lines += [
        f"Audit `{latest['audit_id']}`: {latest['status']}" + (f" ({latest['message']})" if latest["message"] else "")
    ]
    if report_uri:
        lines.append(f"Report: `{report_uri}`")
    significant = _significant(contributions)
    n_rows = 0 if contributions is None else len(contributions)
    n_checks = "none" if pd.isna(latest["checks_failed"]) else int(latest["checks_failed"])
    lines += [
        "",
        "## Counts",
        "",
        f"- images: {latest['images_total']} ({latest['images_added']} added, {latest['images_removed']} removed)",
        f"- (layer, concept, class) rows: {n_rows}, significant: {len(significant)}",
        f"- significant drift rows: {0 if drifting is None else len(drifting)}",
        f"- failed policy check rows: {n_checks if failed is None else len(failed)}",
        "",
        "## Since the previous audit",
        "",
    ]
    past = history(run, "contributions")
    earlier = [] if past is None else [a for a in dict.fromkeys(past["audit_id"]) if a != latest["audit_id"]]
    if not earlier:
        lines.append("- first audit with scores: nothing to compare")
    else:
        before = _significant(past[past["audit_id"] == earlier[-1]])
        new, gone = sorted(significant - before), sorted(before - significant)
        lines.append(f"- compared with audit `{earlier[-1]}`")
        lines.append(f"- newly significant: {len(new)}" + "".join(f"\n  - {' / '.join(map(str, r))}" for r in new[:10]))
        lines.append(
            f"- no longer significant: {len(gone)}" + "".join(f"\n  - {' / '.join(map(str, r))}" for r in gone[:10])
        )
    timings = (run.read_run_record() or {}).get("timings", {})
    seconds = (latest["finished"] - latest["started"]).total_seconds()
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [
        f"| {stage} | {timings[stage].get('seconds')} |" for stage in ("extract", "fit", "score") if stage in timings
    ]
    lines.append(f"| audit (all) | {seconds:.1f} |")
    return lines
