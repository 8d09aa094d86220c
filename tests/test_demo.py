"""`sacv demo` end to end on the reduced data set, with the real pretrained EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sacv.io.rundir import RunDir
from tests.browser import load_in_chromium


@pytest.mark.slow
def test_small_demo_localises_stripes_and_builds_a_working_report(tmp_path, prefect):
    from flows.demo import run_demo

    summary = run_demo(tmp_path / "demo", small=True)
    run = Path(summary["run_dir"])
    tables = RunDir(str(run)).table_names()
    for name in (
        "images",
        "rejects",
        "vectors",
        "image_scores",
        "per_set",
        "top_images",
        "contributions",
        "localisation",
    ):
        assert name in tables, name
    vectors = pd.read_parquet(run / "tables/vectors.parquet")
    striped = vectors[(vectors["concept"] == "striped") & (vectors["kind"] == "concept")]
    assert striped["bal_acc"].min() > 0.9  # stripes are separable from random textures at every layer
    pseudo = vectors[vectors["kind"] == "pseudo"]  # the demo has a random pool: one family every concept shares
    assert set(pseudo["concept"]) == {f"pseudo_{p}" for p in range(5)} and len(pseudo) == 3 * 5 * 3  # layers, P, R
    contributions = pd.read_parquet(run / "tables/contributions.parquet")
    assert contributions["n_reference"].max() == 5 and (contributions["n_random_sets"] == 3).all()

    table = pd.read_parquet(run / "tables/localisation.parquet")
    stripes = table[table["concept"] == "striped"].set_index(["layer", "method"])
    best = stripes.xs("sacv", level="method")["pointing_game"].idxmax()
    sacv, random = stripes.loc[(best, "sacv")], stripes.loc[(best, "random")]
    assert sacv["n_images"] >= 5
    assert sacv["pointing_game"] >= 0.8 and sacv["pointing_game"] >= random["pointing_game"] + 0.3
    assert sacv["mask_auc"] > 0.85 and abs(random["mask_auc"] - 0.5) < 0.1

    errors, widths = load_in_chromium(Path(summary["report"]), tmp_path / "report.png")
    assert not errors, errors
    assert widths and all(w > 0 for w in widths), widths
