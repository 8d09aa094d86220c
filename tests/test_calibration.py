"""Calibration on real activations: placebo concepts stay insignificant, a planted concept is found.

One run of the pipeline with the pretrained EfficientNet-Lite0 at ``_blocks.12``: the concept
``striped`` (striped textures; the audit's zebras are horses filled with stripes) and six placebo
concepts, each a fixed set of images drawn like the random pool (``random_texture``) but never in
it. A placebo's images mean nothing the pool's do not, so the test must find it significant no more
often than alpha: none of its rows survives Holm. The test it replaces (Welch of the concept's R
per-set values against R single vectors of fresh random sets) is computed on the same run's vectors
and flags placebo rows: it tested "these images", not "this concept".
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from sacv.config import parse_config
from sacv.io.rundir import RunDir

LAYER = "_blocks.12"
PLACEBOS = [f"placebo_{i}" for i in range(6)]
CLASSES = {"zebra": ("horse", "striped"), "sorrel": ("horse", "chequered"), "ladybug": ("shape", "dotted")}
R, PER_SET, N, P = 12, 10, 20, 12  # random sets, images per set, images per concept, pseudo-concepts


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_data(root: Path, seed: int = 0) -> None:
    """concepts/{striped,placebo_*}, random/ (R·PER_SET + P·N images: disjoint sets), data/<class>/."""
    from sacv.demo import textures
    from sacv.demo.scenes import CONCEPT_SIZE, make_scene

    def rng(*keys: int) -> np.random.Generator:
        return np.random.default_rng([seed, *keys])

    for i in range(N):
        _save(textures.striped(CONCEPT_SIZE, rng(1, i)), root / "concepts" / "striped" / f"{i}.png")
        for p, name in enumerate(PLACEBOS):
            _save(textures.random_texture(CONCEPT_SIZE, rng(4, p, i)), root / "concepts" / name / f"{i}.png")
    for i in range(R * PER_SET + P * N):
        _save(textures.random_texture(CONCEPT_SIZE, rng(2, i)), root / "random" / f"{i}.png")
    for k, (name, (kind, texture)) in enumerate(CLASSES.items()):
        for i in range(4):
            image, *_ = make_scene(kind, texture, rng(3, k, i))
            _save(image, root / "data" / name / f"{i}.png")


def old_welch(per_set: pd.DataFrame, statistic: str) -> pd.Series:
    """The replaced test, per (concept, target): Welch of the concept's R per-set values against R
    single vectors whose positive sets are all different (pseudo-concept r against random set r)."""
    pseudo = per_set[per_set["kind"] == "pseudo"]
    index = pseudo["concept"].str.removeprefix("pseudo_").astype(int)
    single = pseudo[index == pseudo["random_set"].str.removeprefix("random_").astype(int)]
    out = {}
    for (concept, target), own in per_set[per_set["kind"] == "concept"].groupby(["concept", "target"]):
        null = single.loc[single["target"] == target, statistic].to_numpy(float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[concept, target] = stats.ttest_ind(own[statistic].to_numpy(float), null, equal_var=False).pvalue
    return pd.Series(out)


@pytest.fixture(scope="module")
def calibration_run(tmp_path_factory, prefect):
    from flows.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("calibration")
    write_data(root)
    config = parse_config(
        {
            "run_dir": str(root / "run"),
            "model": {"spec": "efficientnet_lite0"},
            "layers": [LAYER],
            "concepts": {
                "root": str(root / "concepts"),
                "random_pool": str(root / "random"),
                "random_sets": R,
                "images_per_set": PER_SET,
                "images_per_concept": N,
                "pseudo_concepts": P,
            },
            "dataset": {"root": str(root / "data"), "target": "label"},
            "extract": {"shard_size": 32, "batch_size": 16},
            "score": {"min_images": 2},
        }
    )
    run_pipeline(config)
    tables = root / "run" / "tables"
    return pd.read_parquet(tables / "contributions.parquet"), RunDir(str(tables.parent)).read_table("image_scores")


@pytest.mark.slow
def test_placebo_concepts_stay_insignificant_and_the_planted_concept_is_found(calibration_run):
    from sacv.stats.contributions import per_vector

    table, scores = calibration_run
    placebo = table[table["concept"].isin(PLACEBOS)]
    assert len(placebo) == len(PLACEBOS) * len(CLASSES) and placebo["p_value"].notna().all()
    assert not placebo["significant"].any(), placebo[["concept", "class_name", "z", "p_value"]]
    assert (placebo["p_value"] < 0.05).sum() <= 2  # alpha of 18 rows is about 1 (measured: 1)
    zebra = table[(table["concept"] == "striped") & (table["class_name"] == "zebra")].iloc[0]
    assert zebra["significant"] and zebra["direction"] == "positive" and zebra["z"] > 3

    per_set = per_vector(scores)  # the replaced test (default "both": spatial or TCAV), same vectors
    old = pd.concat([old_welch(per_set, "spatial"), old_welch(per_set, "tcav")], axis=1).min(axis=1)
    old_placebo = old[old.index.get_level_values(0).isin(PLACEBOS)]
    assert (old_placebo < 0.05).sum() >= 4 > (placebo["p_value"] < 0.05).sum(), old_placebo  # it tested these images


@pytest.mark.slow
def test_pseudo_concepts_share_one_family_and_are_disjoint(calibration_run):
    _, scores = calibration_run
    pseudo = scores[scores["kind"] == "pseudo"]
    assert sorted(pseudo["concept"].unique()) == sorted(f"pseudo_{p}" for p in range(P))
    assert pseudo.groupby("concept")["random_set"].nunique().eq(R).all()
