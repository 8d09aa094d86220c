"""Audit tasks: build the report, publish the audit as artifacts keyed by the run directory, and
emit an event when checks fail or drift is significant (rows and text: ``sacv.audit.digest``)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from sacv.audit.digest import audit_digest
from sacv.config import RunConfig
from sacv.io import storage
from sacv.report import build

ALERT_EVENT = "sacv.audit.alert"  # docs/deploy.md: an automation on it


def resource_id(slug: str) -> str:
    """The event resource of a run directory: ``sacv.run-dir.<slug>``."""
    return f"sacv.run-dir.{slug}"


@task(name="build-report")
def build_report(run_uri: str, config: RunConfig) -> str:
    """Write RUN/report/index.html; return its path or URL."""
    storage.use(config.storage_options)  # this process may be a Dask worker
    return build.build_report(run_uri)


@task(name="publish-audit")
def publish_audit(run_uri: str, config: RunConfig, report_uri: str | None) -> bool:
    """Artifacts of the latest audit under keys ``<slug>-report|contributions|drift|checks|summary``,
    and the ``sacv.audit.alert`` event when checks failed or drift is significant; return whether it was emitted."""
    storage.use(config.storage_options)
    digest = audit_digest(run_uri, report_uri)
    key, where = digest.slug, f"{run_uri} (audit {digest.audit_id})"
    if report_uri:
        link = report_uri if "://" in report_uri else Path(report_uri).resolve().as_uri()
        create_link_artifact(link, link_text="SACV report", key=f"{key}-report", description=f"Report of {where}")
    create_table_artifact(digest.top, key=f"{key}-contributions", description=f"Top contributions in {where}")
    create_table_artifact(digest.drift, key=f"{key}-drift", description=f"Significant drift in {where}")
    create_table_artifact(digest.failed_checks, key=f"{key}-checks", description=f"Failed policy checks in {where}")
    create_markdown_artifact(digest.markdown, key=f"{key}-summary", description=f"Summary of {where}")
    if not digest.alert:
        return False
    emit_event(
        ALERT_EVENT,
        resource={"prefect.resource.id": resource_id(key), "prefect.resource.name": run_uri},
        payload=digest.alert_payload(),
    )
    get_run_logger().warning(
        "%s: %d failed check rows, %d significant drift rows (event %s)",
        run_uri,
        len(digest.failed_checks),
        len(digest.drift),
        ALERT_EVENT,
    )
    return True
