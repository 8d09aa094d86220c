"""Policy checks (config ``checks:``): assertions a data team writes about every audit.

Kinds (``sacv.config``): ``no_significant_contribution`` (a concept must not contribute
significantly, by default positively, to any class), ``min_spatial_score`` (a (layer, concept,
class) spatial score must reach a value) and ``max_drift`` (no row of drift.parquet may change by
more than a value). ``evaluate_checks`` gives one row per (check, table row) it looks at:

    check (text), kind, row ("layer / concept -> class"), value, threshold, passed

- no_significant_contribution: value ``p_adjusted``, threshold ``score.alpha``; fails where the
  row is significant and its ``direction`` has the given sign (``any``: either);
- min_spatial_score: value ``spatial_score``, threshold ``value``; a missing row fails;
- max_drift: value max(|spatial_change|, |tcav_change|), threshold ``value``; with
  ``significant_only`` a row fails only when its drift is significant. No drift table (the first
  audit) gives no row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sacv.config import RunConfig, unknown_name
from sacv.errors import NotYetRun
from sacv.io.rundir import RunDir

CHECK_COLUMNS = ["check", "kind", "row", "value", "threshold", "passed"]


class ChecksFailed(RuntimeError):
    """Some policy checks failed; the message lists them (``sacv run`` exits with status 4)."""


def describe(check) -> str:
    fields = {k: v for k, v in check.model_dump().items() if k != "kind" and v is not None}
    return f"{check.kind}(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"


def validate_checks(config: RunConfig, concepts: list[str], class_names: list[str]) -> None:
    """Every concept and class a check names exists (ValueError with close names otherwise)."""
    for i, check in enumerate(config.checks):
        if getattr(check, "concept", None) is not None:
            unknown_name(f"checks[{i}].concept", check.concept, concepts)
        for name in [check.class_name] if hasattr(check, "class_name") else getattr(check, "classes", None) or []:
            unknown_name(f"checks[{i}].class", name, class_names)


def _label(row) -> str:
    return f"{row['layer']} / {row['concept']} -> {row['class_name']}"


def evaluate_checks(config: RunConfig, contributions: pd.DataFrame, drift: pd.DataFrame | None) -> pd.DataFrame:
    """The checks table (module docstring) of one audit's contributions and drift tables."""
    rows = []
    for check in config.checks:
        text = describe(check)
        if check.kind == "no_significant_contribution":
            part = contributions[contributions["concept"] == check.concept]
            if check.layer is not None:
                part = part[part["layer"] == check.layer]
            if check.classes is not None:
                part = part[part["class_name"].isin(check.classes)]
            sign = {
                "positive": part["direction"] == "positive",
                "negative": part["direction"] == "negative",
                "any": True,
            }[check.direction]
            failed = part["significant"] & sign
            rows += [
                {
                    "check": text,
                    "kind": check.kind,
                    "row": _label(r),
                    "value": r["p_adjusted"],
                    "threshold": config.score.alpha,
                    "passed": not bad,
                }
                for (_, r), bad in zip(part.iterrows(), failed)
            ]
        elif check.kind == "min_spatial_score":
            part = contributions[
                (contributions["concept"] == check.concept)
                & (contributions["layer"] == check.layer)
                & (contributions["class_name"] == check.class_name)
            ]
            value = float(part["spatial_score"].iloc[0]) if len(part) else np.nan
            rows.append(
                {
                    "check": text,
                    "kind": check.kind,
                    "row": f"{check.layer} / {check.concept} -> {check.class_name}",
                    "value": value,
                    "threshold": check.value,
                    "passed": bool(value >= check.value),
                }
            )
        else:  # max_drift
            if drift is None:
                continue
            size = np.maximum(drift["spatial_change"].abs(), drift["tcav_change"].abs())
            failed = (size > check.value) & (drift["significant"] if check.significant_only else True)
            rows += [
                {
                    "check": text,
                    "kind": check.kind,
                    "row": _label(r),
                    "value": s,
                    "threshold": check.value,
                    "passed": not bad,
                }
                for (_, r), s, bad in zip(drift.iterrows(), size, failed)
            ]
    return pd.DataFrame(rows, columns=CHECK_COLUMNS).astype({"passed": bool})


def run_checks(run_uri: str, config: RunConfig) -> pd.DataFrame:
    """Evaluate the config's checks on the run's latest tables, write ``tables/checks.parquet``;
    return the table (empty when the config has no checks)."""
    run = RunDir(run_uri)
    contributions = run.read_table("contributions")
    if contributions is None:
        raise NotYetRun(f"{run.uri} has no contributions table; checks need the score stage")
    table = evaluate_checks(config, contributions, run.read_table("drift"))
    run.write_table("checks", table)
    return table


def failure_message(table: pd.DataFrame) -> str:
    """The failing checks, one line per row: what a flow run's Failed state and the CLI show."""
    failed = table[~table["passed"]]
    lines = [f"{len(failed)} of {len(table)} policy check rows failed (tables/checks.parquet):"]
    lines += [f"  {r.check}: {r.row}: value {r.value:.3g}, threshold {r.threshold:.3g}" for r in failed.itertuples()]
    return "\n".join(lines)
