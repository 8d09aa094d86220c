"""A plain-text description of a run directory (``sacv inspect RUN_DIR``).

Sized for sweeps: whatever the number of layers, concepts and classes, it prints one line per stage,
a table per layer (vectors; contributions), the ``top`` concepts by significant rows, the ``top``
contribution rows and how to narrow them down (``--layer``, ``--concept``, ``--class``), never a
whole table. Filters apply to the vectors and contributions sections.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd

from sacv.errors import MissingInput
from sacv.io.rundir import RunDir

CONTRIBUTION_COLUMNS = [
    "layer",
    "concept",
    "class_name",
    "n_images",
    "contribution_score",
    "spatial_score",
    "tcav_score",
    "z",
    "p_adjusted",
    "direction",
    "significant",
]


def _table(frame: pd.DataFrame, indent: str = "  ") -> list[str]:
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_colwidth", 40):
        text = frame.to_string(index=False, float_format=lambda v: f"{v:.3g}")
    return [indent + line for line in text.splitlines()]


def _more(shown: int, total: int, what: str) -> list[str]:
    return [f"  ... {total - shown} more {what}"] if total > shown else []


def _filtered(table: pd.DataFrame, filters: dict[str, Sequence[str]]) -> tuple[pd.DataFrame, list[str]]:
    """Rows matching every filter (``column -> accepted values``; ``class_name`` also matches
    ``class_index``); notes for values that match nothing."""
    notes = []
    for column, wanted in filters.items():
        if not wanted or column not in table:
            continue
        names = [table[column].astype(str)]
        if column == "class_name" and "class_index" in table:
            names.append(table["class_index"].astype(str))
        unknown = sorted(set(wanted) - set().union(*(set(n) for n in names)))
        if unknown:
            known = sorted(set(names[0]))
            notes.append(
                f"  no {column} {', '.join(unknown)} here; {len(known)} known: {', '.join(known[:12])}"
                + (" ..." if len(known) > 12 else "")
            )
        keep = names[0].isin(wanted)
        for other in names[1:]:
            keep |= other.isin(wanted)
        table = table[keep]
    return table, notes


def _vectors(vectors: pd.DataFrame, top: int) -> list[str]:
    concept = vectors[vectors["kind"] == "concept"]
    lines = [
        f"vectors  {len(concept)} concept ({int(concept['near_chance'].sum())} near chance), "
        f"{len(vectors) - len(concept)} pseudo-concept; {concept['layer'].nunique()} layers x "
        f"{concept['concept'].nunique()} concepts"
    ]
    if concept.empty:
        return lines
    by_layer = (
        concept.groupby("layer", sort=False)
        .agg(
            vectors=("bal_acc", "size"),
            near_chance=("near_chance", "sum"),
            bal_acc_mean=("bal_acc", "mean"),
            bal_acc_min=("bal_acc", "min"),
        )
        .reset_index()
    )
    lines += _table(by_layer)
    per_concept = concept.groupby(["layer", "concept"], sort=False)["bal_acc"].mean()
    if len(per_concept) > top:
        weakest = per_concept.nsmallest(top).rename("bal_acc_mean").reset_index()
        lines.append(f"  weakest {top} of {len(per_concept)} (layer, concept) by mean held-out balanced accuracy:")
        lines += _table(weakest, "    ")
    return lines


def _contributions(table: pd.DataFrame, top: int) -> list[str]:
    significant = table[table["significant"].fillna(False).astype(bool)]
    lines = [
        f"contributions {len(table)} rows ({table['layer'].nunique()} layers, {table['concept'].nunique()} "
        f"concepts, {table['class_name'].nunique()} classes), {len(significant)} significant "
        f"({int((significant['direction'] == 'positive').sum())} positive, "
        f"{int((significant['direction'] == 'negative').sum())} negative)"
    ]
    if table.empty:
        return lines

    def counts(frame: pd.DataFrame, by: str) -> pd.DataFrame:
        sig = frame["significant"].fillna(False).astype(bool)
        return (
            pd.DataFrame(
                {
                    by: frame[by],
                    "rows": 1,
                    "significant": sig,
                    "positive": sig & (frame["direction"] == "positive"),
                    "negative": sig & (frame["direction"] == "negative"),
                }
            )
            .groupby(by, sort=False)
            .sum()
        )

    if table["layer"].nunique() > 1:
        lines.append("  by layer:")
        lines += _table(counts(table, "layer").reset_index(), "    ")
    if table["concept"].nunique() > 1:
        by_concept = counts(table, "concept").sort_values(["significant", "positive"], ascending=False, kind="stable")
        lines.append(f"  by concept (most significant rows first, {min(top, len(by_concept))} of {len(by_concept)}):")
        lines += _table(by_concept.head(top).reset_index(), "    ") + _more(top, len(by_concept), "concepts")
    shown = (
        table.assign(_z=table["z"].abs()).sort_values(["significant", "_z"], ascending=False, kind="stable").head(top)
    )
    lines.append(f"  top {len(shown)} rows (significant first, by |z| against the pseudo-concepts):")
    lines += _table(shown[[c for c in CONTRIBUTION_COLUMNS if c in shown]], "    ") + _more(
        len(shown), len(table), "rows"
    )
    return lines


def describe_run(
    run_uri: str, top: int = 10, layers: Sequence[str] = (), concepts: Sequence[str] = (), classes: Sequence[str] = ()
) -> str:
    """The text of ``sacv inspect``: ``top`` rows per list; ``layers``, ``concepts``, ``classes``
    (names; a class also by index) keep only those rows of the vectors and contributions."""
    run = RunDir(run_uri)
    if not run.is_run():
        raise MissingInput(f"{run_uri} is not a run directory (no run.json or tables/)")
    record = run.read_run_record() or {}
    lines = [f"run {run.uri}"]
    if "model" in record:
        lines.append(f"model {record['model'].get('spec')} (weights {record['model'].get('weight_hash', '')[:12]})")
    for stage in ("extract", "fit", "score"):
        timing = record.get("timings", {}).get(stage)
        lines.append(
            f"{stage:<8} " + (f"{timing.get('status', 'done')} in {timing.get('seconds')} s" if timing else "not run")
        )
    audits = run.read_audits()
    if audits is not None and len(audits):
        last = audits.iloc[-1]
        lines.append(
            f"audit    {last['audit_id']} {last['status']} at {last['finished']:%Y-%m-%d %H:%M:%S} UTC "
            f"(+{last['images_added']} -{last['images_removed']} images, {last['images_total']} in all; "
            f"{len(audits)} audits, see `sacv history`)"
        )
    images = run.read_table("images", columns=["group", "status"])
    if images is not None:
        ok = images[images["status"] == "ok"]
        counts = ", ".join(f"{g}: {n}" for g, n in ok.groupby("group").size().items())
        lines.append(
            f"images   {counts} (+{(images['status'] == 'duplicate').sum()} duplicates, "
            f"{(images['status'] == 'removed').sum()} removed)"
        )
    rejects = run.read_table("rejects")
    if rejects is not None and len(rejects):
        lines.append(f"rejects  {len(rejects)}:")
        lines += [f"  {r.path}: {r.stage}: {r.reason}" for r in rejects.head(top).itertuples()]
        lines += _more(min(top, len(rejects)), len(rejects), "in tables/rejects.parquet")
    filters = {"layer": list(layers), "concept": list(concepts)}
    vectors = run.read_table("vectors")
    if vectors is not None:
        vectors, notes = _filtered(vectors, filters)
        lines += _vectors(vectors, top) + notes
    table = run.read_table("contributions")
    if table is not None:
        table, notes = _filtered(table, {**filters, "class_name": list(classes)})
        lines += _contributions(table, top) + notes
    if (vectors is not None or table is not None) and not (layers or concepts or classes):
        lines.append("narrow down: sacv inspect RUN_DIR --layer L --concept K --class C (each repeatable) --top N")
        lines.append("whole tables: RUN_DIR/tables/*.parquet (pandas.read_parquet, DuckDB) or sacv.open_run(RUN_DIR)")
    return "\n".join(lines)


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (NaN -> None, timestamps -> ISO text)."""
    return json.loads(frame.to_json(orient="records", date_format="iso"))


def run_facts(
    run_uri: str, top: int = 10, layers: Sequence[str] = (), concepts: Sequence[str] = (), classes: Sequence[str] = ()
) -> dict:
    """What ``sacv inspect --json`` prints: one object with stable keys ``run_dir``, ``model``,
    ``stages`` (stage -> its timing record, or None), ``last_audit``, ``audits``, ``images``
    (status -> group -> count), ``rejects`` (count and the first ``top``), ``vectors`` (count, near
    chance) and ``contributions`` (rows, significant, positive, negative and the ``top`` rows,
    significant first by |z|), after the same filters as the text."""
    run = RunDir(run_uri)
    if not run.is_run():
        raise MissingInput(f"{run_uri} is not a run directory (no run.json or tables/)")
    record = run.read_run_record() or {}
    timings = record.get("timings", {})
    facts: dict = {
        "run_dir": run.uri,
        "model": record.get("model"),
        "stages": {stage: timings.get(stage) for stage in ("extract", "fit", "score")},
    }
    audits = run.read_audits()
    facts["audits"] = 0 if audits is None else len(audits)
    facts["last_audit"] = None if audits is None or not len(audits) else _records(audits.tail(1))[0]
    images = run.read_table("images", columns=["group", "status"])
    facts["images"] = (
        {} if images is None else {s: g.groupby("group").size().to_dict() for s, g in images.groupby("status")}
    )
    rejects = run.read_table("rejects")
    facts["rejects"] = {
        "count": 0 if rejects is None else len(rejects),
        "first": [] if rejects is None else _records(rejects.head(top)),
    }
    filters = {"layer": list(layers), "concept": list(concepts)}
    vectors = run.read_table("vectors")
    if vectors is not None:
        vectors, _ = _filtered(vectors, filters)
    facts["vectors"] = (
        None if vectors is None else {"count": len(vectors), "near_chance": int(vectors["near_chance"].sum())}
    )
    table = run.read_table("contributions")
    facts["contributions"] = None
    if table is not None:
        table, _ = _filtered(table, {**filters, "class_name": list(classes)})
        significant = table["significant"].fillna(False).astype(bool)
        shown = table.assign(_z=table["z"].abs()).sort_values(["significant", "_z"], ascending=False, kind="stable")
        facts["contributions"] = {
            "rows": len(table),
            "significant": int(significant.sum()),
            "positive": int((significant & (table["direction"] == "positive")).sum()),
            "negative": int((significant & (table["direction"] == "negative")).sum()),
            "top": _records(shown.head(top)[[c for c in CONTRIBUTION_COLUMNS if c in shown]]),
        }
    return facts
