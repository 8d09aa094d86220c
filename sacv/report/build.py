"""A static, self-contained HTML report of a run (``sacv report RUN_DIR``).

``build_report`` writes ``RUN/report/index.html``: header (model, layers, counts, timings), the
contributions table (sortable by clicking a header, filtered by a search box, at most
``CONTRIBUTION_ROWS`` rows: ``sacv.report.contributions_view``), a concept × layer heat map of
spatial scores per class, spatial maps and receptive-field patches of the strongest (class,
concept, layer) rows, a per-layer profile, the audit history with the drift table and the drifting
rows' scores over audits, the policy checks, the localisation table when there is one, and the
rejects. The page stays small at any run size: at
most ``MAX_SECTIONS`` sections of two figures each and three more figures, each embedded as a
compact data URI no wider than it is shown (``sacv.report.figures``), and at most ``TABLE_ROWS``
rows of the drift, checks and rejects tables. No server, network, font or script outside the file
is needed (``sacv.report.html``). Every text from files, folders, configs and tables is HTML-escaped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sacv.api import Run
from sacv.errors import MissingInput
from sacv.io.images import ImageRejected
from sacv.io.rundir import RunDir
from sacv.report import figures as plots
from sacv.report.contributions_view import contributions_html, ordered_contributions, shown_contributions
from sacv.report.html import cut_note, esc, fmt, html_page, table_html
from sacv.stats.contributions import SCORE_COLUMN

MAX_SECTIONS = 12
TABLE_ROWS = 300  # rows shown of the drift, checks and rejects tables; all of them stay in the Parquet files
GALLERY_PATCHES = 12
HISTORY_PANELS = 6


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
            from sacv.method.models import load_model

            config = self.record.get("config", {}).get("model", {})
            try:
                self._model = load_model(config.get("spec") or self.record["model"]["spec"], config.get("weights"))
            except Exception as err:  # noqa: BLE001 - the report must still be written
                self._model_error = f"{type(err).__name__}: {err}"
        return self._model

    def field(self, layer: str, size: tuple[int, int]):
        if (layer, size) not in self._fields:
            from sacv.method.receptive_field import receptive_field

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
    highest = ctx.api.top_images(layer, concept, cls, n=top_images).set_index("row")["s_kc_sum"]
    lowest = ctx.api.top_images(layer, concept, cls, n=top_images, lowest=True).set_index("row")["s_kc_sum"]
    ranked = pd.concat([highest, lowest[~lowest.index.isin(highest.index)]])
    top, bottom = list(highest.index), [r for r in lowest.index if r not in highest.index]
    maps, pictures, labels, captions, positions = [], [], [], [], []
    for rank, r in [(f"top {i + 1}", r) for i, r in enumerate(top)] + [
        (f"bottom {i + 1}", r) for i, r in enumerate(bottom)
    ]:
        image, path = ctx.picture(int(r))
        m = ctx.api.maps(int(r), layer, concept, recompute=False)  # the notebook's maps, stored gradients only
        maps.append(m)
        pictures.append(image)
        labels.append(f"{rank}\nΣS→c = {ranked[r]:.3g}")
        captions.append(
            f'<b>{esc(rank)}</b>: {esc(path.rsplit("/", 1)[-1])} <span class="path">({esc(path)})</span>, '
            f"mean Σ S<sub>k→c</sub> = {ranked[r]:.3g}"
        )
        m_kc, decision = m.sel(map="S_kc").to_numpy(), m.sel(map="decision").to_numpy()
        if m.attrs["gradients"] != "none" and rank.startswith("top"):
            shown = image if image is not None else np.full((*m_kc.shape, 3), 200, dtype=np.uint8)
            positions += [
                (float(m_kc[i, j]), shown, shown.shape[:2], int(i), int(j), bool(decision[i, j] > 0))
                for i in range(m_kc.shape[0])
                for j in range(m_kc.shape[1])
            ]
    if all(m.attrs["gradients"] == "none" for m in maps):
        notes.append(
            "no stored gradients (extract.keep_gradients: false): S<sub>k→c</sub> maps and patches are not shown"
        )
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


def _chosen_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    ordered = ordered_contributions(table)
    significant = ordered[ordered["significant"]]
    if len(significant):
        return significant.head(MAX_SECTIONS), True
    return ordered.head(3), False


def _section_html(section: Section, significant: bool) -> str:
    row = section.row
    title = f"{esc(row['concept'])} → class {esc(row['class_name'])} at {esc(row['layer'])}"
    tested = row[SCORE_COLUMN[row["statistic"]]]
    stats = (
        f"{esc(row['statistic'])} {fmt(tested)} (pseudo-concepts {fmt(row['reference_mean'])} ± "
        f"{fmt(row['reference_sd'])}, z {fmt(row['z'])}), spatial score {fmt(row['spatial_score'])}, "
        f"TCAV {fmt(row['tcav_score'])}, p<sub>adj</sub> {fmt(row['p_adjusted'])}"
    )
    if significant:
        negative = row["direction"] == "negative"
        badge = (
            f'<span class="badge sig{" neg" if negative else ""}">significant: '
            f"{'lowers' if negative else 'raises'} the class logit</span>"
        )
    else:
        badge = '<span class="badge ns">not significant</span>'
    parts = [f'<section class="concept"><h3>{title} {badge}</h3><p class="stats">{stats}</p>']
    parts += [f'<p class="note">{note}</p>' for note in section.notes]
    if section.maps_uri:
        parts.append(
            f'<figure><img src="{section.maps_uri}" alt="concept maps"><figcaption>Images of class '
            f"{esc(row['class_name'])} with the highest and lowest Σ S<sub>k→c</sub> (mean over random sets); "
            f"maps with the concept's mean unit vector over its random sets. Blue: negative, red: positive."
            f"<ul>{''.join(f'<li>{c}</li>' for c in section.captions)}</ul></figcaption></figure>"
        )
    if section.gallery_uri:
        parts.append(
            f'<figure><img src="{section.gallery_uri}" alt="receptive-field patches"><figcaption>Receptive fields '
            f"(in the model input) of the positions with the highest S<sub>k→c</sub> among relevant positions "
            f"(decision &gt; 0) of the top images; title: (row, col) in the layer and S<sub>k→c</sub>."
            "</figcaption></figure>"
        )
    return "".join(parts) + "</section>"


def _header(run: RunDir, record: dict, images, rejects, vectors, table) -> str:
    model = record.get("model", {})
    config = record.get("config", {})
    facts = [
        ("run directory", run.uri),
        ("model", model.get("spec", "?")),
        ("weights", (config.get("model") or {}).get("weights") or "the spec's default"),
        ("weight hash", model.get("weight_hash", "?")),
        ("layers", ", ".join(config.get("layers", []))),
    ]
    if images is not None:
        ok = images[images["status"] == "ok"]
        facts.append(
            (
                "images",
                ", ".join(f"{g}: {n}" for g, n in ok.groupby("group").size().items())
                + f" (+{int((images['status'] == 'duplicate').sum())} duplicates)",
            )
        )
    facts.append(("rejects", 0 if rejects is None else len(rejects)))
    if vectors is not None:
        concept = vectors[vectors["kind"] == "concept"]
        facts.append(
            (
                "vectors",
                f"{len(concept)} concept ({int(concept['near_chance'].sum())} near chance), "
                f"{len(vectors) - len(concept)} pseudo-concept",
            )
        )
    if table is not None:
        signs = table.loc[table["significant"], "direction"].value_counts()
        facts.append(
            (
                "contributions",
                f"{len(table)} rows, {int(table['significant'].sum())} significant "
                f"({signs.get('positive', 0)} raise, {signs.get('negative', 0)} lower the class logit)",
            )
        )
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _timings(record: dict) -> pd.DataFrame:
    rows = []
    for stage, timing in (record.get("timings") or {}).items():
        timing = timing if isinstance(timing, dict) else {"value": timing}
        details = ", ".join(f"{k}: {v}" for k, v in sorted(timing.items()) if k not in ("status", "seconds"))
        rows.append(
            {"stage": stage, "status": timing.get("status"), "seconds": timing.get("seconds"), "details": details}
        )
    return pd.DataFrame(rows, columns=["stage", "status", "seconds", "details"])


def _history_html(run: RunDir) -> list[str]:
    """The audits, the score over audits of the drifting rows (significant ones, else the largest
    changes; at most ``HISTORY_PANELS``) and the drift table, largest change first."""
    from sacv.audit.audits import done_audits, history

    audits = done_audits(run)
    if audits.empty:
        return []
    columns = [
        "audit_id",
        "finished",
        "status",
        "images_total",
        "images_added",
        "images_removed",
        "shards_run",
        "weight_hash",
    ]
    parts = [f"<h2>History ({len(audits)} audits)</h2>" + table_html(audits[columns], "audits")]
    drift = run.read_table("drift")
    if drift is None or drift.empty:
        return parts + ['<p class="note">No drift table yet: it needs two audits with scores.</p>']
    shown = drift[drift["significant"]] if drift["significant"].any() else drift
    figure = plots.history_figure(
        history(run, "contributions"),
        shown.head(HISTORY_PANELS),
        audits.loc[audits["status"] == "done", "audit_id"].tolist(),
    )
    note = (
        ""
        if drift["significant"].any()
        else '<p class="note">No row drifted significantly; the rows with the largest changes are shown.</p>'
    )
    parts.append(f"<h3>Drift: audit {esc(drift['after'].iloc[0])} against {esc(drift['before'].iloc[0])}</h3>{note}")
    if figure:
        parts.append(
            f'<figure><img src="{figure}" alt="scores over audits"><figcaption>Spatial and TCAV score of '
            "each shown row in every audit (1 = the oldest).</figcaption></figure>"
        )
    shown = drift.drop(columns=["before", "after"]).head(TABLE_ROWS)
    parts.append(cut_note(len(shown), len(drift), "drift", "largest change first"))
    parts.append(table_html(shown, "drift", row_class=lambda r: "sig" if r["significant"] else ""))
    return parts


def build_report(run_uri: str, top_images: int = 3) -> str:
    """Write ``RUN/report/index.html`` (see module docstring) and return its path or URL."""
    run = RunDir(run_uri)
    record = run.read_run_record() or {}
    if not run.is_run():
        raise MissingInput(f"{run_uri} is not a run directory (no run.json or tables/)")
    images, rejects = run.read_table("images", columns=["group", "status"]), run.read_table("rejects")
    vectors = run.read_table("vectors")
    table = run.read_table("contributions")
    layers = record.get("config", {}).get("layers") or (
        [] if vectors is None else list(dict.fromkeys(vectors["layer"]))
    )
    body = [
        f"<h1>SACV run report</h1>{_header(run, record, images, rejects, vectors, table)}",
        "<h2>Stage timings</h2>" + table_html(_timings(record), "timings"),
    ]
    if table is None:
        body.append('<h2>Contributions</h2><p class="note">No contributions table: run the score stage.</p>')
    else:
        shown = shown_contributions(table)
        more = (
            f" Shown: the {len(shown)} significant or strongest of {len(table)} rows; all of them are in "
            "tables/contributions.parquet."
            if len(shown) < len(table)
            else ""
        )
        body.append(
            "<h2>Contributions</h2><p>One row per (class, concept, layer); click a column header to sort, "
            "type in the box to filter. Significant rows are highlighted: green where the concept raises "
            "the class logit (direction positive), red where it lowers it (negative); they come first, in "
            f"that order.{esc(more)}</p>"
            '<input type="search" class="filter" data-table="contributions" aria-label="filter rows" '
            'placeholder="filter: class, concept or layer">' + contributions_html(shown)
        )
        heatmap = plots.sweep_heatmap(table, layers)
        if heatmap:
            body.append(
                "<h2>Sweep: spatial score per concept and layer</h2><p>One panel per class (most significant "
                "rows first); * marks significant rows.</p>"
                f'<figure><img src="{heatmap}" alt="spatial score per concept and layer"></figure>'
            )
        chosen, significant = _chosen_rows(table)
        body.append("<h2>Where the concepts are</h2>")
        if not significant:
            body.append(
                f'<p class="note">No row is significant; the {len(chosen)} rows with the largest |effect size| '
                "are shown, and they are <b>not significant</b>.</p>"
            )
        elif table["significant"].sum() > MAX_SECTIONS:
            body.append(
                f"<p>The first {MAX_SECTIONS} significant rows are shown: those that raise the class logit, "
                "then those that lower it, each by |effect size|.</p>"
            )
        if len(chosen) and vectors is not None and images is not None:
            ctx = _Context(run, record)
            body += [_section_html(_section(ctx, row, top_images), significant) for _, row in chosen.iterrows()]
    profile = plots.profile_figure(vectors, table, layers)
    if profile:
        body.append(
            "<h2>Per-layer profile: where does a concept emerge?</h2>"
            f'<figure><img src="{profile}" alt="per-layer profile"></figure>'
        )
    body += _history_html(run)
    checks = run.read_table("checks")
    if checks is not None and len(checks):
        failed = int((~checks["passed"]).sum())
        shown = checks.sort_values("passed", kind="stable").head(TABLE_ROWS)  # the failed rows first
        body.append(
            f"<h2>Policy checks ({failed} of {len(checks)} rows failed)</h2>"
            + cut_note(len(shown), len(checks), "checks", "the failed rows first")
            + table_html(shown, "checks", row_class=lambda r: "" if r["passed"] else "fail")
        )
    localisation = run.read_table("localisation")
    if localisation is not None:
        body.append("<h2>Localisation</h2>" + table_html(localisation, "localisation"))
    body.append(f"<h2>Rejects ({0 if rejects is None else len(rejects)})</h2>")
    if rejects is not None and len(rejects):
        shown = rejects[[c for c in ("path", "group", "stage", "reason") if c in rejects.columns]].head(TABLE_ROWS)
        body.append(cut_note(len(shown), len(rejects), "rejects") + table_html(shown, "rejects"))
    else:
        body.append("<p>None.</p>")
    return run.write_report(html_page(f"SACV report: {run.uri}", "\n".join(body)))
