"""A static, self-contained HTML report of a run (``sacv report RUN_DIR``).

``build_report`` writes ``RUN/report/index.html``: header (model, layers, counts, timings), the
contributions table (sortable by clicking a header, filtered by a search box, at most
``CONTRIBUTION_ROWS`` rows), a concept × layer heat map of spatial scores per class, spatial maps
and receptive-field patches of the strongest (class, concept, layer) rows, a per-layer profile, the
audit history with the drift table and the drifting rows' scores over audits, the policy checks, the
localisation table when there is one, and the rejects. Plots are embedded PNG data URIs; no server,
network, font or script outside the file is needed. Every text from files, folders, configs and tables is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sacv import report_plots as plots
from sacv.api import Run
from sacv.images import ImageRejected
from sacv.rundir import RunDir

MAX_SECTIONS = 12
CONTRIBUTION_ROWS = 300  # rows of the contributions table shown (significant first); the rest stay in the Parquet file
GALLERY_PATCHES = 12
HISTORY_PANELS = 6
CONTRIBUTION_VIEW = [  # (header, column, formatter); the first column of a cell is its sort key
    ("class", "class_name"), ("layer", "layer"), ("concept", "concept"), ("n_images", "n_images"),
    ("spatial_score [95% CI]", "spatial_score"), ("spatial null", "spatial_score_null"),
    ("tcav_score", "tcav_score"), ("tcav null", "tcav_score_null"), ("p_adjusted", "p_adjusted"),
    ("effect_size", "effect_size"), ("direction", "direction"), ("significant", "significant"), ("reason", "reason"),
]


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def fmt(value) -> str:
    """Display text of one table value (escaped)."""
    if _missing(value):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    return esc(value)


def sort_key(value) -> str:
    if _missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    return esc(value)


def table_html(frame: pd.DataFrame, table_id: str, cells=None, row_class=None) -> str:
    """A sortable table; ``cells(row) -> [(sort key, html)]`` overrides the generic cells."""
    headers = [name for name, *_ in CONTRIBUTION_VIEW] if cells else list(frame.columns)
    head = "".join(f'<th tabindex="0" scope="col">{esc(h)}</th>' for h in headers)
    body = []
    for _, row in frame.iterrows():
        items = cells(row) if cells else [(sort_key(v), fmt(v)) for v in row]
        klass = f' class="{row_class(row)}"' if row_class and row_class(row) else ""
        body.append(f"<tr{klass}>" + "".join(f'<td data-v="{k}">{v}</td>' for k, v in items) + "</tr>")
    return (f'<div class="scroll"><table class="sortable" id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _contribution_cells(row) -> list[tuple[str, str]]:
    out = []
    for _, column in CONTRIBUTION_VIEW:
        value = row[column]
        shown = fmt(value)
        if column == "spatial_score" and not _missing(row["spatial_score_ci_low"]):
            shown += f' <span class="ci">[{fmt(row["spatial_score_ci_low"])}, {fmt(row["spatial_score_ci_high"])}]</span>'
        out.append((sort_key(value), shown))
    return out


@dataclass
class Section:
    row: pd.Series
    maps_uri: str | None
    captions: list[str]
    gallery_uri: str | None
    notes: list[str]


class _Context:
    """What the per-section figures need: the run (``sacv.api.Run``: rankings, vectors, maps, as a
    notebook sees them) and (lazily) the model."""

    def __init__(self, run: RunDir, record: dict):
        self.run, self.record = run, record
        self.api = Run(run)
        self._model, self._model_error, self._fields = None, None, {}

    def model(self):
        if self._model is None and self._model_error is None:
            from sacv.models import load_model

            config = self.record.get("config", {}).get("model", {})
            try:
                self._model = load_model(config.get("spec") or self.record["model"]["spec"], config.get("weights"))
            except Exception as err:  # noqa: BLE001 - the report must still be written
                self._model_error = f"{type(err).__name__}: {err}"
        return self._model

    def field(self, layer: str, size: tuple[int, int]):
        if (layer, size) not in self._fields:
            from sacv.receptive_field import receptive_field

            self._fields[layer, size] = receptive_field(self.model().module, layer, size)
        return self._fields[layer, size]

    def picture(self, row: int) -> tuple[np.ndarray | None, str]:
        path = str(self.api.image(row)["path"])
        try:
            return self.api.picture(row), path
        except ImageRejected as err:
            return None, path + f" (unreadable now: {err})"


def _section(ctx: _Context, row: pd.Series, top_images: int) -> Section:
    layer, concept, cls = row["layer"], row["concept"], int(row["class_index"])
    notes: list[str] = []
    ranked = ctx.api.top_images(layer, concept, cls, n=None).set_index("row")["s_kc_sum"]
    top = list(ranked.index[:top_images])
    bottom = [r for r in ranked.index[::-1][:top_images] if r not in top]
    maps, pictures, labels, captions, positions = [], [], [], [], []
    for rank, r in [(f"top {i + 1}", r) for i, r in enumerate(top)] + [(f"bottom {i + 1}", r) for i, r in enumerate(bottom)]:
        image, path = ctx.picture(int(r))
        m = ctx.api.maps(int(r), layer, concept, recompute=False)  # the notebook's maps, stored gradients only
        maps.append(m)
        pictures.append(image)
        labels.append(f"{rank}\nΣS→c = {ranked[r]:.3g}")
        captions.append(f"<b>{esc(rank)}</b>: {esc(path.rsplit('/', 1)[-1])} <span class=\"path\">({esc(path)})</span>, "
                        f"mean Σ S<sub>k→c</sub> = {ranked[r]:.3g}")
        m_kc, decision = m.sel(map="S_kc").to_numpy(), m.sel(map="decision").to_numpy()
        if m.attrs["gradients"] != "none" and rank.startswith("top"):
            shown = image if image is not None else np.full((*m_kc.shape, 3), 200, dtype=np.uint8)
            positions += [(float(m_kc[i, j]), shown, shown.shape[:2], int(i), int(j), bool(decision[i, j] > 0))
                          for i in range(m_kc.shape[0]) for j in range(m_kc.shape[1])]
    if all(m.attrs["gradients"] == "none" for m in maps):
        notes.append("no stored gradients (extract.keep_gradients: false): S<sub>k→c</sub> maps and patches are not shown")
    maps_uri = plots.overlay_figure(maps, pictures, labels) if maps else None
    return Section(row, maps_uri, captions, _gallery(ctx, layer, positions, notes), notes)


def _gallery(ctx: _Context, layer: str, positions: list, notes: list[str]) -> str | None:
    if not positions:
        return None
    relevant = [p for p in positions if p[5]]
    if not relevant:
        notes.append("no position of the top images is relevant (decision ≤ 0): patches ranked over all positions")
    chosen = sorted(relevant or positions, key=lambda p: -p[0])[:GALLERY_PATCHES]
    if ctx.model() is None:
        notes.append(f"receptive fields need the model, which did not load: {esc(ctx._model_error)}")
        return None
    patches, labels = [], []
    for value, image, size, i, j, _ in chosen:
        top, left, bottom, right = ctx.field(layer, tuple(size)).box(i, j)
        patches.append(image[top:bottom, left:right])
        labels.append(f"({i}, {j}) S→c {value:.2g}")
    return plots.patch_gallery(patches, labels)


def ordered_contributions(table: pd.DataFrame) -> pd.DataFrame:
    """Significant rows that raise the class logit, then significant rows that lower it, then the
    rest; within each, the largest |effect size| first."""
    group = np.select([table["significant"] & (table["direction"] == "positive"), table["significant"]], [0, 1], 2)
    ordered = table.assign(_g=group, _s=-table["effect_size"].abs().fillna(-1.0))
    return ordered.sort_values(["_g", "_s"], kind="stable").drop(columns=["_g", "_s"])


def _row_class(row) -> str:
    if not row["significant"]:
        return ""
    return "sig neg" if row["direction"] == "negative" else "sig"


def shown_contributions(table: pd.DataFrame) -> pd.DataFrame:
    """At most ``CONTRIBUTION_ROWS`` rows, in :func:`ordered_contributions` order: every significant
    row first (while they fit), then the strongest of the rest."""
    return ordered_contributions(table).head(CONTRIBUTION_ROWS)


def _chosen_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    ordered = ordered_contributions(table)
    significant = ordered[ordered["significant"]]
    if len(significant):
        return significant.head(MAX_SECTIONS), True
    return ordered.head(3), False


def _section_html(section: Section, significant: bool) -> str:
    row = section.row
    title = f"{esc(row['concept'])} → class {esc(row['class_name'])} at {esc(row['layer'])}"
    stats = (f"spatial score {fmt(row['spatial_score'])} (null {fmt(row['spatial_score_null'])}), "
             f"TCAV {fmt(row['tcav_score'])} (null {fmt(row['tcav_score_null'])}), "
             f"effect size {fmt(row['effect_size'])}, p<sub>adj</sub> {fmt(row['p_adjusted'])}")
    if significant:
        negative = row["direction"] == "negative"
        badge = (f'<span class="badge sig{" neg" if negative else ""}">significant: '
                 f'{"lowers" if negative else "raises"} the class logit</span>')
    else:
        badge = '<span class="badge ns">not significant</span>'
    parts = [f'<section class="concept"><h3>{title} {badge}</h3><p class="stats">{stats}</p>']
    parts += [f'<p class="note">{note}</p>' for note in section.notes]
    if section.maps_uri:
        parts.append(f'<figure><img src="{section.maps_uri}" alt="concept maps"><figcaption>Images of class '
                     f'{esc(row["class_name"])} with the highest and lowest Σ S<sub>k→c</sub> (mean over random sets); '
                     f'maps with the concept\'s mean unit vector over its random sets. Blue: negative, red: positive.'
                     f'<ul>{"".join(f"<li>{c}</li>" for c in section.captions)}</ul></figcaption></figure>')
    if section.gallery_uri:
        parts.append(f'<figure><img src="{section.gallery_uri}" alt="receptive-field patches"><figcaption>Receptive fields '
                     f'(in the model input) of the positions with the highest S<sub>k→c</sub> among relevant positions '
                     f'(decision &gt; 0) of the top images; title: (row, col) in the layer and S<sub>k→c</sub>.</figcaption></figure>')
    return "".join(parts) + "</section>"


def _header(run: RunDir, record: dict, images, rejects, vectors, table) -> str:
    model = record.get("model", {})
    config = record.get("config", {})
    facts = [("run directory", run.uri), ("model", model.get("spec", "?")),
             ("weights", (config.get("model") or {}).get("weights") or "the spec's default"),
             ("weight hash", model.get("weight_hash", "?")), ("layers", ", ".join(config.get("layers", [])))]
    if images is not None:
        ok = images[images["status"] == "ok"]
        facts.append(("images", ", ".join(f"{g}: {n}" for g, n in ok.groupby("group").size().items())
                      + f" (+{int((images['status'] == 'duplicate').sum())} duplicates)"))
    facts.append(("rejects", 0 if rejects is None else len(rejects)))
    if vectors is not None:
        concept = vectors[vectors["kind"] == "concept"]
        facts.append(("vectors", f"{len(concept)} concept ({int(concept['near_chance'].sum())} near chance), "
                                 f"{len(vectors) - len(concept)} null"))
    if table is not None:
        signs = table.loc[table["significant"], "direction"].value_counts()
        facts.append(("contributions", f"{len(table)} rows, {int(table['significant'].sum())} significant "
                                       f"({signs.get('positive', 0)} raise, {signs.get('negative', 0)} lower the class logit)"))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _timings(record: dict) -> pd.DataFrame:
    rows = []
    for stage, timing in (record.get("timings") or {}).items():
        timing = timing if isinstance(timing, dict) else {"value": timing}
        details = ", ".join(f"{k}: {v}" for k, v in sorted(timing.items()) if k not in ("status", "seconds"))
        rows.append({"stage": stage, "status": timing.get("status"), "seconds": timing.get("seconds"), "details": details})
    return pd.DataFrame(rows, columns=["stage", "status", "seconds", "details"])


def _history_html(run: RunDir) -> list[str]:
    """The audits, the score over audits of the drifting rows (significant ones, else the largest
    changes; at most ``HISTORY_PANELS``) and the drift table, largest change first."""
    from sacv.audits import done_audits, history

    audits = done_audits(run)
    if audits.empty:
        return []
    columns = ["audit_id", "finished", "status", "images_total", "images_added", "images_removed", "shards_run", "weight_hash"]
    parts = [f"<h2>History ({len(audits)} audits)</h2>" + table_html(audits[columns], "audits")]
    drift = run.read_table("drift")
    if drift is None or drift.empty:
        return parts + ['<p class="note">No drift table yet: it needs two audits with scores.</p>']
    shown = drift[drift["significant"]] if drift["significant"].any() else drift
    figure = plots.history_figure(history(run, "contributions"), shown.head(HISTORY_PANELS),
                                  audits.loc[audits["status"] == "done", "audit_id"].tolist())
    note = ("" if drift["significant"].any() else
            '<p class="note">No row drifted significantly; the rows with the largest changes are shown.</p>')
    parts.append(f"<h3>Drift: audit {esc(drift['after'].iloc[0])} against {esc(drift['before'].iloc[0])}</h3>{note}")
    if figure:
        parts.append(f'<figure><img src="{figure}" alt="scores over audits"><figcaption>Spatial and TCAV score of '
                     "each shown row in every audit (1 = the oldest).</figcaption></figure>")
    parts.append(table_html(drift.drop(columns=["before", "after"]), "drift", row_class=lambda r: "sig" if r["significant"] else ""))
    return parts


def build_report(run_uri: str, top_images: int = 3) -> str:
    """Write ``RUN/report/index.html`` (see module docstring) and return its path or URL."""
    run = RunDir(run_uri)
    record = run.read_run_record() or {}
    if not run.is_run():
        raise FileNotFoundError(f"{run_uri} is not a run directory (no run.json or tables/)")
    images, rejects, vectors = run.read_table("images"), run.read_table("rejects"), run.read_table("vectors")
    table = run.read_table("contributions")
    layers = record.get("config", {}).get("layers") or ([] if vectors is None else list(dict.fromkeys(vectors["layer"])))
    body = [f"<h1>SACV run report</h1>{_header(run, record, images, rejects, vectors, table)}",
            "<h2>Stage timings</h2>" + table_html(_timings(record), "timings")]
    if table is None:
        body.append('<h2>Contributions</h2><p class="note">No contributions table: run the score stage.</p>')
    else:
        shown = shown_contributions(table)
        more = (f" Shown: the {len(shown)} significant or strongest of {len(table)} rows; all of them are in "
                "tables/contributions.parquet." if len(shown) < len(table) else "")
        body.append("<h2>Contributions</h2><p>One row per (class, concept, layer); click a column header to sort, "
                    "type in the box to filter. Significant rows are highlighted: green where the concept raises "
                    "the class logit (direction positive), red where it lowers it (negative); they come first, in "
                    f"that order.{esc(more)}</p>"
                    '<input type="search" class="filter" data-table="contributions" aria-label="filter rows" '
                    'placeholder="filter: class, concept or layer">'
                    + table_html(shown, "contributions", _contribution_cells, _row_class))
        heatmap = plots.sweep_heatmap(table, layers)
        if heatmap:
            body.append("<h2>Sweep: spatial score per concept and layer</h2><p>One panel per class (most significant "
                        "rows first); * marks significant rows.</p>"
                        f'<figure><img src="{heatmap}" alt="spatial score per concept and layer"></figure>')
        chosen, significant = _chosen_rows(table)
        body.append("<h2>Where the concepts are</h2>")
        if not significant:
            body.append(f'<p class="note">No row is significant; the {len(chosen)} rows with the largest |effect size| '
                        "are shown, and they are <b>not significant</b>.</p>")
        elif table["significant"].sum() > MAX_SECTIONS:
            body.append(f"<p>The first {MAX_SECTIONS} significant rows are shown: those that raise the class logit, "
                        "then those that lower it, each by |effect size|.</p>")
        if len(chosen) and vectors is not None and images is not None:
            ctx = _Context(run, record)
            body += [_section_html(_section(ctx, row, top_images), significant) for _, row in chosen.iterrows()]
    profile = plots.profile_figure(vectors, table, layers)
    if profile:
        body.append('<h2>Per-layer profile: where does a concept emerge?</h2>'
                    f'<figure><img src="{profile}" alt="per-layer profile"></figure>')
    body += _history_html(run)
    checks = run.read_table("checks")
    if checks is not None and len(checks):
        failed = int((~checks["passed"]).sum())
        body.append(f"<h2>Policy checks ({failed} of {len(checks)} rows failed)</h2>"
                    + table_html(checks, "checks", row_class=lambda r: "" if r["passed"] else "fail"))
    localisation = run.read_table("localisation")
    if localisation is not None:
        body.append("<h2>Localisation</h2>" + table_html(localisation, "localisation"))
    body.append(f"<h2>Rejects ({0 if rejects is None else len(rejects)})</h2>")
    if rejects is not None and len(rejects):
        body.append(table_html(rejects[[c for c in ("path", "group", "stage", "reason") if c in rejects.columns]], "rejects"))
    else:
        body.append("<p>None.</p>")
    head, tail = _PAGE.split("{body}")
    page = head.replace("{title}", esc(f"SACV report: {run.uri}")) + "\n".join(body) + tail
    return run.write_report(page)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d2430;background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:1.6em;margin:.2em 0 .6em}h2{font-size:1.25em;margin:1.8em 0 .5em;border-bottom:2px solid #e3e6eb;padding-bottom:.2em}
h3{font-size:1.05em;margin:.2em 0}p{line-height:1.45}
table{border-collapse:collapse;font-size:.86em;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #e8eaee;text-align:left;vertical-align:top}
table.sortable th{background:#eef1f5;cursor:pointer;user-select:none;white-space:nowrap;position:sticky;top:0}
table.sortable th:hover{background:#dde3ea}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2";font-size:.8em}
table.sortable th[aria-sort=descending]::after{content:" \\25BC";font-size:.8em}
table.sortable tbody tr:nth-child(even){background:#fafbfc}
table.sortable tbody tr.sig{background:#e3f4e1;font-weight:600}table.sortable tbody tr.sig.neg{background:#fbe3e1}
table.sortable tbody tr.fail{background:#fde2e1;font-weight:600}
input.filter{margin:4px 0 8px;padding:4px 8px;width:320px;max-width:100%}
table.facts{width:auto}table.facts th{color:#5a6372;font-weight:600;padding-right:18px;white-space:nowrap}
table.facts td{word-break:break-all;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.95em}
.scroll{overflow-x:auto;max-height:560px;overflow-y:auto;border:1px solid #e3e6eb;border-radius:4px}
.ci{color:#6b7480;font-size:.9em}.path{color:#6b7480;font-size:.85em;word-break:break-all}
.note{background:#fff6e0;border-left:4px solid #e6a700;padding:6px 10px}
section.concept{border:1px solid #e3e6eb;border-radius:6px;padding:12px 16px;margin:16px 0}
.stats{color:#3c4654;margin:.3em 0 .6em}
.badge{font-size:.75em;padding:2px 8px;border-radius:10px;margin-left:6px;vertical-align:middle}
.badge.sig{background:#2e7d32;color:#fff}.badge.sig.neg{background:#b3261e}.badge.ns{background:#c9ced6;color:#1d2430}
figure{margin:10px 0}figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#3c4654;margin-top:4px}figcaption ul{margin:4px 0;padding-left:20px}
</style></head>
<body><main>
{body}
</main>
<script>
(function(){
  document.querySelectorAll("input.filter").forEach(function(box){
    var table=document.getElementById(box.getAttribute("data-table"));
    box.addEventListener("input",function(){var q=box.value.toLowerCase();
      Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
        r.style.display=r.textContent.toLowerCase().indexOf(q)<0?"none":"";});});
  });
  function key(td){var v=td.getAttribute("data-v");if(v===null)v=td.textContent;var n=Number(v);
    return v===""?[2,""]:(isNaN(n)?[1,v.toLowerCase()]:[0,n]);}
  function cmp(a,b){return a[0]-b[0]||(a[1]<b[1]?-1:a[1]>b[1]?1:0);}
  document.querySelectorAll("table.sortable").forEach(function(table){
    var heads=table.querySelectorAll("thead th");
    heads.forEach(function(th,i){
      function sort(){
        var asc=th.getAttribute("aria-sort")!=="ascending",body=table.tBodies[0];
        heads.forEach(function(h){h.removeAttribute("aria-sort");});
        th.setAttribute("aria-sort",asc?"ascending":"descending");
        var rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(x,y){var a=key(x.cells[i]),b=key(y.cells[i]);
          return a[0]===2||b[0]===2?a[0]-b[0]:(asc?1:-1)*cmp(a,b);});
        rows.forEach(function(r){body.appendChild(r);});
      }
      th.addEventListener("click",sort);
      th.addEventListener("keydown",function(e){if(e.key==="Enter"||e.key===" "){e.preventDefault();sort();}});
    });
  });
})();
</script>
</body></html>
"""
