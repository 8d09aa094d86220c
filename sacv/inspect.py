"""A plain-text description of a run directory (``sacv inspect RUN_DIR``)."""

from __future__ import annotations

import pandas as pd

from sacv.rundir import RunDir


def describe_run(run_uri: str, top: int = 10) -> str:
    run = RunDir(run_uri)
    if not run.is_run():
        raise FileNotFoundError(f"{run_uri} is not a run directory (no run.json or tables/)")
    record = run.read_run_record() or {}
    lines = [f"run {run.uri}"]
    if "model" in record:
        lines.append(f"model {record['model'].get('spec')} (weights {record['model'].get('weight_hash', '')[:12]})")
    for stage in ("extract", "fit", "score"):
        timing = record.get("timings", {}).get(stage)
        lines.append(f"{stage:<8} " + (f"{timing.get('status', 'done')} in {timing.get('seconds')} s" if timing else "not run"))
    audits = run.read_audits()
    if audits is not None and len(audits):
        last = audits.iloc[-1]
        lines.append(f"audit    {last['audit_id']} {last['status']} at {last['finished']:%Y-%m-%d %H:%M:%S} UTC "
                     f"(+{last['images_added']} -{last['images_removed']} images, {last['images_total']} in all; "
                     f"{len(audits)} audits, see `sacv history`)")
    images = run.read_table("images")
    if images is not None:
        ok = images[images["status"] == "ok"]
        counts = ", ".join(f"{g}: {n}" for g, n in ok.groupby("group").size().items())
        lines.append(f"images   {counts} (+{(images['status'] == 'duplicate').sum()} duplicates, "
                     f"{(images['status'] == 'removed').sum()} removed)")
    rejects = run.read_table("rejects")
    if rejects is not None and len(rejects):
        lines.append(f"rejects  {len(rejects)}:")
        lines += [f"  {r.path}: {r.stage}: {r.reason}" for r in rejects.head(top).itertuples()]
    vectors = run.read_table("vectors")
    if vectors is not None:
        concept = vectors[vectors["kind"] == "concept"]
        lines.append(f"vectors  {len(concept)} concept ({int(concept['near_chance'].sum())} near chance), "
                     f"{len(vectors) - len(concept)} null; "
                     f"mean held-out balanced accuracy by layer: "
                     + ", ".join(f"{layer} {acc:.3f}" for layer, acc in vectors[vectors['kind'] == 'concept'].groupby('layer')['bal_acc'].mean().items()))
    table = run.read_table("contributions")
    if table is not None:
        lines.append(f"contributions {len(table)} rows, {int(table['significant'].sum())} significant; top {top}:")
        shown = table.sort_values(["significant", "effect_size"], ascending=False).head(top)
        columns = ["layer", "concept", "class_name", "n_images", "spatial_score", "tcav_score", "p_adjusted", "significant"]
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            lines.append(shown[columns].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return "\n".join(lines)
