"""The sign of v_k through the real fit stage (plan -> fit_block -> collect), on a tiny planted store:
no model, no Prefect, a few seconds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from sacv.config import parse_config
from sacv.extract.catalog import IMAGE_COLUMNS
from sacv.fit.fit_plan import collect_vectors, plan_fits
from sacv.fit.sweep import fit_block
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import ensure_array, open_store, store_identity

LAYER, HW, C = "block", 4, 8


def planted_run(
    tmp_path,
    concept_is_positive_u: bool = True,
    n_concept: int = 12,
    n_random: int = 60,
    seed: int = 0,
    shift: float = 5.0,
    mixing: np.ndarray | None = None,
    fit: dict | None = None,
    images_per_concept: int = 12,
    pseudo_concepts: int = 3,
):
    """A run directory whose guidance activations put concept images at +shift·u (or -shift·u) and
    random images at 0, plus noise (standard normal, times ``mixing`` (C, C) when given): the fitted
    concept vector must point along +u (or -u). The concept is fitted with ``images_per_concept`` of
    its images; the random images form a separate pool, so one family of ``pseudo_concepts``
    pseudo-concepts (random images against random images) is fitted. The defaults fill the pool
    exactly (3 random sets of 8 + 3 pseudo-concepts of 12 = 60): every set disjoint from the others."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=C)
    u /= np.linalg.norm(u)
    run = RunDir(str(tmp_path / "run"))
    n = n_concept + n_random
    rows = [
        {
            "image_id": f"{i:04d}",
            "path": f"/x/{i}.png",
            "group": "guidance",
            "role": "concept" if i < n_concept else "random",
            "concept": "striped" if i < n_concept else "random",
            "label": pd.NA,
            "mask": None,
            "row": i,
            "shard": i // 8,
            "status": "ok",
        }
        for i in range(n)
    ]
    images = pd.DataFrame(rows, columns=IMAGE_COLUMNS).astype({"label": "Int64", "row": "Int64", "shard": "Int64"})
    identity = store_identity("planted", "0" * 64, {"crop": 32}, {LAYER: [HW, HW, C]}, "float32")
    root = open_store(run.store_uri, identity)
    act = ensure_array(root, f"guidance/{LAYER}/act", (n, HW, HW, C), 8, "float32")
    sign = 1.0 if concept_is_positive_u else -1.0
    values = rng.normal(size=(n, HW, HW, C))  # (N, H, W, C)
    if mixing is not None:
        values = values @ mixing.T  # correlated noise, covariance mixing @ mixing.T
    values[:n_concept] += sign * shift * u
    act[...] = values.astype(np.float32)
    run.write_table("images", images)
    (tmp_path / "concepts").mkdir()
    config = parse_config(
        {
            "run_dir": run.uri,
            "layers": [LAYER],
            "concepts": {
                "root": str(tmp_path / "concepts"),
                "random_pool": str(tmp_path / "concepts"),
                "random_sets": 3,
                "images_per_set": 8,
                "images_per_concept": images_per_concept,
                "pseudo_concepts": pseudo_concepts,
            },
            "fit": {"solver": "lbfgs", **(fit or {})},
        }
    )
    return run, config, u


def fit_all(run: RunDir, config) -> pd.DataFrame:
    plan = plan_fits(run.uri, config)
    for layer, keys in plan.blocks:
        fit_block(run.uri, config, layer, keys)
    return collect_vectors(run.uri)


@pytest.mark.parametrize("concept_is_positive_u", [True, False])
def test_concept_vectors_point_towards_the_planted_concept(tmp_path, concept_is_positive_u):
    run, config, u = planted_run(tmp_path, concept_is_positive_u)
    table = fit_all(run, config)
    v = zarr.open_group(run.store_uri, mode="r")[f"vectors/{LAYER}/v"][...]  # (K_total, C) unit rows
    expected = u if concept_is_positive_u else -u
    concept = table[table["kind"] == "concept"]
    assert len(concept) == 3
    for row in concept["vector_row"]:
        assert v[row] @ expected > 0.95  # direction and sign
    assert (concept["bal_acc"] > 0.95).all()
    pseudo = table[table["kind"] == "pseudo"]
    assert len(pseudo) == 3 * 3  # P pseudo-concepts, each against the R random sets
    assert set(pseudo["concept"]) == {"pseudo_0", "pseudo_1", "pseudo_2"}  # one shared family: no ":<concept>"
    assert (pseudo["n_pos"] == concept["n_pos"].iloc[0]).all()  # the concept's size, nothing dropped (disjoint)
    assert (pseudo["bal_acc"] < 0.75).all()  # random images vs random images: near chance
    for row in pseudo["vector_row"]:
        assert abs(v[row] @ u) < 0.9  # no pull towards the planted direction


def test_decision_is_positive_exactly_on_the_concept_side(tmp_path):
    run, config, u = planted_run(tmp_path)
    table = fit_all(run, config)
    group = zarr.open_group(run.store_uri, mode="r")
    v, b = group[f"vectors/{LAYER}/v"][...], group[f"vectors/{LAYER}/b"][...]
    row = int(table.loc[table["kind"] == "concept", "vector_row"].iloc[0])
    act = group[f"guidance/{LAYER}/act"][...]  # (N, H, W, C)
    decision = np.einsum("nhwc,c->nhw", act, v[row]) + b[row]
    assert (decision[:12] > 0).mean() > 0.95  # concept images: classifier says concept
    assert (decision[12:] > 0).mean() < 0.05  # random images: it does not
