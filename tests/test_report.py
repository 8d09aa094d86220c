"""The static HTML report: escaped, self-contained, complete, and working in a headless browser."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flows.pipeline import run_pipeline
from sacv.report.build import build_report
from tests.flow_helpers import pipeline_config, write_collection

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory, prefect):
    root = write_collection(tmp_path_factory.mktemp("report"), n_per_concept=5, n_per_class=5)
    # "/" cannot be in a file name: each class folder holds a folder "<script>alert(1)<" with
    # "script>.png" in it, so the image's path ends in "<script>alert(1)</script>.png". One per class:
    # the report's sections show the images of the rows it picks, whichever class they are of.
    for seed, name in enumerate(("cat", "zebra"), start=7):
        evil = root / "data" / name / f"{EVIL}.png"
        evil.parent.mkdir()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(evil)
    (root / "data" / "zebra" / "empty.png").write_bytes(b"")  # a reject
    config = pipeline_config(root)
    run_pipeline(config)
    run = Path(config.run_dir)
    images = pd.read_parquet(run / "tables/images.parquet")
    for name, label in (("cat", 0), ("zebra", 2)):  # the catalog took the files, in their classes
        assert images.loc[images["path"] == str(root / "data" / name / f"{EVIL}.png"), "label"].tolist() == [label]
    localisation = pd.DataFrame(
        {"layer": ["features.2"], "concept": ["striped"], "pointing_game": [0.75], "note": ["<b>bold?</b>"]}
    )
    localisation.to_parquet(run / "tables/localisation.parquet", index=False)
    start = time.perf_counter()
    path = build_report(str(run))
    seconds = time.perf_counter() - start
    assert Path(path) == run / "report/index.html"
    print(f"report built in {seconds:.2f} s")
    return run, Path(path), Path(path).read_text(encoding="utf-8")


class Tables(HTMLParser):
    """Rows (lists of cell texts) of the body of every table with an id."""

    def __init__(self):
        super().__init__()
        self.tables, self._table, self._in_body, self._cell = {}, None, False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self._table.append([])
        elif tag == "td" and self._in_body and self._table is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._table, self._in_body = None, False
        elif tag == "td" and self._cell is not None:
            self._table[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_text_from_files_is_escaped(report):
    run, _, page = report
    assert EVIL not in page
    assert ESCAPED in page  # the file's path, in the section of its class or in a caption
    assert page.count("<script") == 1  # only the page's own inline script
    assert "<b>bold?</b>" not in page and "&lt;b&gt;bold?&lt;/b&gt;" in page
    assert str(run) in page


def embedded(uri: str) -> Image.Image:
    """The image of a ``data:image/(webp|png);base64,`` URI, checked to be of the format it says."""
    kind, data = re.fullmatch(r"data:image/(webp|png);base64,(.*)", uri).groups()
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert image.format == kind.upper() and image.width > 0
    return image


def test_the_page_is_self_contained(report):
    _, _, page = report
    assert "http://" not in page and "https://" not in page
    assert "href=" not in page and "<link" not in page and "@import" not in page
    sources = re.findall(r"<img\b[^>]*?\bsrc=\"([^\"]*)\"", page)
    assert sources and len(sources) == page.count("<img")
    for source in sources:
        with embedded(source) as image:
            image.verify()


def test_the_page_stays_small(report):
    """Figures in compact formats, no wider than shown, within a byte budget each; a bounded number
    of them; every section still there."""
    from sacv.report.build import MAX_SECTIONS
    from sacv.report.figures import FIGURE_WIDTH

    _, _, page = report
    figures = re.findall(r'<img src="(data:[^"]*)" alt="([^"]*)"', page)
    photos = [uri for uri, alt in figures if alt in ("concept maps", "receptive-field patches")]
    assert photos and len(figures) <= 2 * MAX_SECTIONS + 3
    for uri, _ in figures:
        with embedded(uri) as image:
            assert image.width <= FIGURE_WIDTH
            assert len(uri) < 2000 + 0.5 * image.width * image.height  # a PNG of a photograph takes ~3 bytes a pixel
    assert all(uri.startswith("data:image/webp;") for uri in photos)  # lossy: photographs under the maps
    assert re.findall(r"<h2>([^<(]*)", page) == [
        "Stage timings",
        "Contributions",
        "Sweep: spatial score per concept and layer",
        "Where the concepts are",
        "Per-layer profile: where does a concept emerge?",
        "History ",
        "Localisation",
        "Rejects ",
    ]


def test_tables_match_the_run(report):
    run, _, page = report
    tables = Tables()
    tables.feed(page)
    contributions = pd.read_parquet(run / "tables/contributions.parquet")
    assert len(tables.tables["contributions"]) == len(contributions) == 12
    assert sum(row[-2] == "yes" for row in tables.tables["contributions"]) == int(contributions["significant"].sum())
    rejects = tables.tables["rejects"]
    assert len(rejects) == 1 and rejects[0][0].endswith("empty.png") and rejects[0][2] == "read"
    assert tables.tables["localisation"] == [["features.2", "striped", "0.75", "<b>bold?</b>"]]
    assert [row[0] for row in tables.tables["timings"]] == ["extract", "fit", "score"]
    assert page.count('<section class="concept">') >= 1
    assert "per-layer profile" in page
    assert "spatial score per concept and layer" in page and 'class="filter"' in page


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (apt-get install chromium); CI=1 makes this a failure")
    return path or "/usr/bin/chromium"


def test_the_page_works_in_headless_chromium(report, tmp_path):
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    _, path, _ = report
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(path.as_uri(), wait_until="load")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert widths and all(w > 0 for w in widths), widths
            shown = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.clientWidth)")
            assert all(w <= s for w, s in zip(widths, shown, strict=True)), (widths, shown)  # none scaled down

            def column(index):
                return page.eval_on_selector_all(
                    "#contributions tbody tr", f"rows => rows.map(r => r.cells[{index}].getAttribute('data-v'))"
                )

            headers = page.eval_on_selector_all("#contributions thead th", "ths => ths.map(t => t.textContent)")
            effect = headers.index("z (vs pseudo-concepts)")
            before = column(effect)
            page.click(f"#contributions thead th:nth-child({effect + 1})")
            ascending = [float(v) for v in column(effect) if v]
            assert ascending == sorted(ascending) and len(ascending) == len([v for v in before if v])
            assert page.get_attribute(f"#contributions thead th:nth-child({effect + 1})", "aria-sort") == "ascending"
            page.click(f"#contributions thead th:nth-child({effect + 1})")
            descending = [float(v) for v in column(effect) if v]
            assert descending == sorted(descending, reverse=True)
            page.click("#contributions thead th:nth-child(3)")  # concept: text
            concepts = column(2)
            assert concepts == sorted(concepts)
            assert not errors, errors
        finally:
            browser.close()
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.width >= 1280 and shot.height > 900


def sweep_table(concepts: int = 30, layers: int = 4, classes: int = 10, seed: int = 0) -> pd.DataFrame:
    """A contributions table of a sweep: every (class, concept, layer), a few significant."""
    rng = np.random.default_rng(seed)
    rows = [
        {
            "layer": f"l{layer}",
            "concept": f"c{k:02d}",
            "class_index": c,
            "class_name": f"class{c}",
            "n_images": 5,
            "spatial_score": rng.uniform(),
            "z": rng.normal(),
            "significant": bool(rng.random() < 0.05),
        }
        for c in range(classes)
        for k in range(concepts)
        for layer in range(layers)
    ]
    table = pd.DataFrame(rows)
    return table.assign(direction=np.where(table["z"] > 0, "positive", "negative"))


def test_a_sweep_table_is_cut_to_the_significant_and_strongest_rows():
    from sacv.report.contributions_view import CONTRIBUTION_ROWS, shown_contributions

    table = sweep_table()
    shown = shown_contributions(table)
    assert len(table) == 1200 and len(shown) == CONTRIBUTION_ROWS
    assert shown["significant"].sum() == table["significant"].sum()  # every significant row is kept
    rest = shown[~shown["significant"]]
    dropped = table.drop(index=shown.index)
    assert rest["z"].abs().min() >= dropped["z"].abs().max()  # then the strongest (|z| against the pseudo-concepts)
    small = table.head(40)
    pd.testing.assert_frame_equal(shown_contributions(small).sort_index(), small)  # small tables are shown whole


def test_the_sweep_heatmap_has_one_panel_per_class_up_to_the_cap():
    from sacv.report.figures import sweep_heatmap

    def size(uri):
        with embedded(uri) as image:
            return image.size

    layers = ["l0", "l1", "l2", "l3"]
    few, many = sweep_heatmap(sweep_table(classes=2), layers), sweep_heatmap(sweep_table(classes=30), layers)
    assert size(few)[0] < size(many)[0]  # 2 panels vs a row of 4
    assert size(sweep_heatmap(sweep_table(classes=12), layers)) == size(many)  # capped at 12 classes
    assert sweep_heatmap(sweep_table().head(0), layers) is None
