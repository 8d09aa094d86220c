"""`sacv inspect` at sweep scale: thousands of vector and contribution rows give a bounded summary
(per layer, per concept, top rows, how to filter), and the filters narrow it down. No model, no Prefect."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from click.testing import CliRunner

from sacv.cli import main
from sacv.io.rundir import RunDir
from sacv.report.summary import describe_run

LAYERS = [f"_blocks.{i}" for i in (4, 8, 11, 14)]
CONCEPTS = [f"concept_{k:02d}" for k in range(50)]
CLASSES = [f"class_{c}" for c in range(20)]


def sweep_run(tmp_path) -> str:
    """A run directory holding the tables of a 4 layers x 50 concepts x 10 random sets sweep (a shared
    family of 4 pseudo-concepts) scored on 20 classes: 2 160 vectors, 4 000 contribution rows."""
    rng = np.random.default_rng(0)
    run = RunDir(str(tmp_path / "run"))
    run.update_run_record(
        model={"spec": "efficientnet_lite0", "weight_hash": "ab" * 32},
        timings={"fit": {"status": "done", "seconds": 12.0}},
    )
    vectors = [
        {
            "layer": layer,
            "concept": k,
            "random_set": f"random_{r}",
            "kind": "concept",
            "bal_acc": rng.uniform(0.55, 1),
            "near_chance": False,
        }
        for layer in LAYERS
        for k in CONCEPTS
        for r in range(10)
    ]
    vectors += [
        {
            "layer": layer,
            "concept": f"pseudo_{p}",
            "random_set": f"random_{r}",
            "kind": "pseudo",
            "bal_acc": rng.uniform(0.55, 1),
            "near_chance": False,
        }
        for layer in LAYERS
        for p in range(4)
        for r in range(10)
    ]
    table = pd.DataFrame(vectors)
    table["near_chance"] = table["bal_acc"] < 0.6
    run.write_table("vectors", table)
    rows = [
        {
            "layer": layer,
            "concept": k,
            "class_index": c,
            "class_name": name,
            "n_images": 12,
            "contribution_score": rng.normal(),
            "spatial_score": rng.uniform(),
            "tcav_score": rng.uniform(),
            "z": rng.normal(),
            "p_adjusted": rng.uniform(),
        }
        for layer in LAYERS
        for k in CONCEPTS
        for c, name in enumerate(CLASSES)
    ]
    contributions = pd.DataFrame(rows)
    contributions["significant"] = contributions["p_adjusted"] < 0.05
    contributions["direction"] = np.where(contributions["z"] > 0, "positive", "negative")
    run.write_table("contributions", contributions)
    return run.uri


def test_inspect_summarises_a_sweep_in_a_bounded_page(tmp_path):
    uri = sweep_run(tmp_path)
    text = describe_run(uri, top=10)
    lines = text.splitlines()
    assert len(lines) < 70 and max(map(len, lines)) < 220  # not 4 000 rows
    # 160 pseudo-concept vectors (4 per layer x 10 random sets), whatever the word for them
    assert re.search(r"vectors  2000 concept \(\d+ near chance\), 160 [\w-]+; 4 layers x 50 concepts", text), text
    assert "contributions 4000 rows (4 layers, 50 concepts, 20 classes)" in text
    assert "by layer:" in text and all(sum(layer in line for line in lines) >= 2 for layer in LAYERS)  # both tables
    assert "by concept (most significant rows first, 10 of 50):" in text and "... 40 more concepts" in text
    assert "top 10 rows" in text and "... 3990 more rows" in text
    table = RunDir(uri).read_table("contributions")
    strongest = table.assign(size=table["z"].abs()).sort_values(["significant", "size"], ascending=False).head(10)
    header = next(i for i, line in enumerate(lines) if line.startswith("  top 10 rows"))
    shown = [line.split()[:3] for line in lines[header + 2 : header + 12]]
    assert shown == strongest[["layer", "concept", "class_name"]].values.tolist()  # significant first, by |z|
    assert "weakest 10 of 200 (layer, concept)" in text
    assert "--layer L --concept K --class C" in text  # how to narrow it down


def test_inspect_filters_by_layer_concept_and_class(tmp_path):
    uri = sweep_run(tmp_path)
    text = describe_run(uri, top=5, layers=["_blocks.8"], concepts=["concept_07", "concept_09"])
    assert "contributions 40 rows (1 layers, 2 concepts, 20 classes)" in text
    assert "vectors  20 concept" in text and "by layer:" not in text
    top_rows = text.split("top 5 rows")[1].splitlines()[2:7]
    assert all("_blocks.8" in line and ("concept_07" in line or "concept_09" in line) for line in top_rows)
    by_index = describe_run(uri, classes=["3"], concepts=["concept_07"])  # a class by its index
    assert "contributions 4 rows (4 layers, 1 concepts, 1 classes)" in by_index and "class_3" in by_index
    unknown = describe_run(uri, layers=["_blocks.99"])
    assert "no layer _blocks.99 here; 4 known: _blocks.11, _blocks.14, _blocks.4, _blocks.8" in unknown
    result = CliRunner().invoke(main, ["inspect", uri, "--layer", "_blocks.8", "--class", "class_2", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "contributions 50 rows (1 layers, 50 concepts, 1 classes)" in result.output
