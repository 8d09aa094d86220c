"""Model comparison (``sacv compare RUN_A RUN_B``): two runs over the same collection and concepts
(two models or two weight files), per (layer, concept, class) the change in contribution from A to
B, with the drift test (``sacv.audit.drift``: Welch on the per-set scores, corrected over the table).

Writes ``OUT/compare.parquet`` (``DRIFT_COLUMNS``, ``before`` = RUN_A, ``after`` = RUN_B) and a
small self-contained ``OUT/compare.html``.
"""

from __future__ import annotations

import fsspec
import pandas as pd

from sacv.audit.drift import drift_table
from sacv.errors import NotYetRun
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import class_names_of


def _side(run_uri: str) -> tuple[RunDir, pd.DataFrame, pd.Series, dict]:
    """A run's per-set table, its scored images' ids and its run record."""
    run = RunDir(run_uri)
    per_set, images = run.read_table("per_set"), run.read_table("images", columns=["group", "status", "image_id"])
    if per_set is None or images is None:
        raise NotYetRun(f"{run_uri} has no per_set table; run `sacv run` (or score) there first")
    scored = images[(images["status"] == "ok") & (images["group"] == "dataset")]["image_id"]
    return run, per_set, scored, run.read_run_record() or {}


def compare_runs(
    run_a: str, run_b: str, out: str, alpha: float | None = None, correction: str | None = None
) -> pd.DataFrame:
    """The comparison table of two runs (module docstring); ``alpha`` and ``correction`` default to
    RUN_B's score settings. Raises ValueError when the runs share no (layer, concept, class) row."""
    (a, per_set_a, images_a, record_a), (b, per_set_b, images_b, record_b) = _side(run_a), _side(run_b)
    names_a, names_b = class_names_of(a.store_uri), class_names_of(b.store_uri)
    if names_a != names_b:
        raise ValueError(
            f"the models of {run_a} and {run_b} have different classes; compare models with the same classes"
        )
    score = (record_b.get("config") or {}).get("score", {})
    table = drift_table(
        per_set_a,
        per_set_b,
        names_b,
        alpha or score.get("alpha", 0.05),
        correction or score.get("correction", "holm"),
        labels=(a.uri, b.uri),
        statistic=score.get("statistic", "contribution"),
    )
    if table.empty:
        raise ValueError(
            f"{run_a} and {run_b} share no (layer, concept, class) row; compare runs with the same layers and concepts"
        )
    shared = len(set(images_a) & set(images_b))
    model_a, model_b = record_a.get("model") or {}, record_b.get("model") or {}
    facts = {
        "A": f"{a.uri}: {model_a.get('spec')} weights {model_a.get('weight_hash', '')[:12]}",
        "B": f"{b.uri}: {model_b.get('spec')} weights {model_b.get('weight_hash', '')[:12]}",
        "images": f"{images_a.nunique()} in A, {images_b.nunique()} in B, {shared} in both",
        "rows": f"{len(table)}, {int(table['significant'].sum())} with a significant change",
    }
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/compare.parquet", "wb") as f:
        table.to_parquet(f, index=False)
    with fs.open(f"{root}/compare.html", "w") as f:
        f.write(compare_page(table, facts))
    return table


def compare_page(table: pd.DataFrame, facts: dict[str, str]) -> str:
    """A sortable HTML page of the comparison table, largest change first, significant rows highlighted."""
    from sacv.report.html import esc, html_page, table_html

    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts.items())
    body = (
        f'<h1>SACV model comparison</h1><table class="facts">{rows}</table>'
        "<h2>Change in contribution, B - A</h2><p>Welch tests on the per-random-set scores of both runs, "
        "corrected over the table; click a header to sort.</p>"
        + table_html(
            table.drop(columns=["before", "after"]), "compare", row_class=lambda r: "sig" if r["significant"] else ""
        )
    )
    return html_page("SACV model comparison", body)
