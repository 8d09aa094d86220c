"""A drift planted in real data, found by two real audits with the pretrained EfficientNet-Lite0.

Between two audits of one run directory, five striped textures labelled ``ladybug`` arrive (a
mislabelled batch); before, the ladybug images (horses of dotted, chequered, honeycomb and spiral
textures) show no stripes. At ``_blocks.15`` the model's ladybug logit rises along the striped
vector on striped positions, so the striped -> ladybug contribution changes, more than that of the
pseudo-concepts (sets of 10 random textures, as many images as the concept), which is what the
drift test asks. Measured with this configuration over 14 data seeds (0-13): the tested statistic,
the contribution (mean S_k->c over the vector's relevant positions), -3.4e-3 to -4.1e-4 before and
-5.0e-4 to +1.0e-3 after (change +8.8e-4 to +2.9e-3), z 5.1 to 65 against the changes of the 5
pseudo-concepts; the row was significant in 14 of 14, adjusted p at most 0.029 (seed 0: -1.2e-3
-> +1.0e-3, z 7.0, adjusted p 0.0092). Spatial score 0.02-0.32 before, 0.33-0.84 after (change
+0.31 to +0.78; significant in 12 of 14 had it been the tested statistic), TCAV score 0.00-0.12
before, 0.00-0.44 after (change 0.00 to +0.38; significant in 3 of 14). Rows of the other classes
cannot change: their images, vectors and per-image scores are the same in both audits, and so are
the pseudo-concepts' (no spread: rank p-value 1).

Why not striped -> zebra: it is saturated. The zebra logit rises along the striped vector almost
wherever the vector fires, whatever the zebra images show (spatial score 0.96-1.00 at ``_blocks.15``
and 0.72-0.93 at ``_blocks.12`` for zebra images without stripes, measured with the earlier
configuration of 6 random sets of 15 images), so adding stripes to the zebra class cannot move it.
Why 5 pseudo-concepts: the change is one more draw among theirs, t with P - 1 degrees of freedom;
Holm over the table's 3 rows needs p < 0.017, z above 4.3 with P = 5 (the smallest measured was
5.1); with 10 (a pool of 130 images, seeds 0-9) the row was significant in 10 of 10 as well (z 3.6
to 21, adjusted p at most 0.022), at more extraction and fits. The pool holds 3 x 10 + 5 x 10 = 80
random images, so that every random set and pseudo-concept is disjoint. With 5 images per class
(earlier configuration), the ladybug class before the change sometimes had no relevant position for
some vector, so 8 images per class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sacv.config import parse_config

LAYER = "_blocks.15"
PLANTED = "ladybug"
# class -> (scene kind, textures of its objects, taken in turn); none of them striped but zebra's
CLASSES = {
    PLANTED: ("horse", ("dotted", "chequered", "honeycomb", "spiralled")),
    "zebra": ("horse", ("striped",)),
    "sorrel": ("horse", ("chequered",)),
}
SEED = 0
CONCEPT_IMAGES = 10  # the striped folder: images_per_concept, and the size of each pseudo-concept
RANDOM_SETS, IMAGES_PER_SET, PSEUDO_CONCEPTS = 3, 10, 5
POOL = RANDOM_SETS * IMAGES_PER_SET + PSEUDO_CONCEPTS * CONCEPT_IMAGES  # 80: every set disjoint


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_audit_data(
    root: Path, seed: int = SEED, n_concept: int = CONCEPT_IMAGES, n_random: int = POOL, n_per_class: int = 8
) -> None:
    """concepts/striped, random/ (the random pool) and data/<class>/ scenes (see ``CLASSES``)."""
    from sacv.demo import textures
    from sacv.demo.scenes import CONCEPT_SIZE, make_scene

    def rng(*keys: int) -> np.random.Generator:
        return np.random.default_rng([seed, *keys])

    for i in range(n_concept):
        _save(textures.striped(CONCEPT_SIZE, rng(1, i)), root / "concepts" / "striped" / f"striped_{i}.png")
    for i in range(n_random):
        _save(textures.random_texture(CONCEPT_SIZE, rng(2, i)), root / "random" / f"random_{i}.png")
    for k, (name, (kind, concepts)) in enumerate(CLASSES.items()):
        for i in range(n_per_class):
            image, *_ = make_scene(kind, concepts[i % len(concepts)], rng(3, k, i))
            _save(image, root / "data" / name / f"{name}_{i}.png")


def add_striped(root: Path, n: int = 5, seed: int = SEED) -> None:
    from sacv.demo import textures
    from sacv.demo.scenes import SCENE_SIZE

    for i in range(n):
        _save(
            textures.striped(SCENE_SIZE, np.random.default_rng([seed, 5, i])),
            root / "data" / PLANTED / f"added_{i}.png",
        )


@pytest.mark.slow
def test_striped_images_added_to_one_class_are_flagged_as_drift(tmp_path, prefect):
    from flows.pipeline import run_pipeline
    from sacv.io.rundir import RunDir

    write_audit_data(tmp_path)
    config = parse_config(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"spec": "efficientnet_lite0"},
            "layers": [LAYER],
            "concepts": {
                "root": str(tmp_path / "concepts"),
                "random_pool": str(tmp_path / "random"),
                "random_sets": RANDOM_SETS,
                "images_per_set": IMAGES_PER_SET,
                "images_per_concept": CONCEPT_IMAGES,
                "pseudo_concepts": PSEUDO_CONCEPTS,
            },
            "dataset": {"root": str(tmp_path / "data"), "target": "label"},
            "extract": {"shard_size": 16, "batch_size": 16},
            "score": {"min_images": 2},
            "execution": {"device": "cpu"},
        }
    )
    first = run_pipeline(config)
    # the pool holds every random set and pseudo-concept disjoint (3 x 10 + 5 x 10 = 80 images)
    jobs = RunDir(config.run_dir).read_fit_plan()
    sets = {tuple(job["pos"]) for job in jobs if job["kind"] == "pseudo"}
    sets |= {tuple(job["neg"]) for job in jobs if job["kind"] == "concept"}
    assert len(sets) == RANDOM_SETS + PSEUDO_CONCEPTS and all(len(ids) == 10 for ids in sets)
    assert len(set().union(*sets)) == POOL
    add_striped(tmp_path, n=5)
    second = run_pipeline(config)
    assert second.extract.added == 5 and second.extract.shards_run == 1  # the new rows' shard only
    assert second.fit.fitted == 0  # same guidance, same seed: the same vectors, paired drift

    drift = RunDir(config.run_dir).read_table("drift")
    assert set(drift["before"]) == {first.audit_id} and set(drift["after"]) == {second.audit_id}
    assert len(drift) == len(CLASSES)  # one layer, one concept, one row per class
    assert (drift["statistic"] == "contribution").all() and (drift["n_reference"] == PSEUDO_CONCEPTS).all()
    assert (drift["n_sets_before"] == RANDOM_SETS).all() and (drift["n_sets_after"] == RANDOM_SETS).all()
    planted = drift.set_index("class_name").loc[PLANTED]
    assert planted["concept"] == "striped" and planted["significant"], planted.to_dict()
    assert planted["change"] > 0 and planted["z"] > 0 and planted["reference_sd"] > 0, planted.to_dict()
    assert planted["spatial_change"] > 0.2 and planted["tcav_change"] > 0.05, planted.to_dict()
    assert drift.iloc[0]["class_name"] == PLANTED  # the largest change (in reference SDs) leads the table

    untouched = drift[drift["class_name"] != PLANTED]
    assert not untouched["significant"].any(), untouched.to_dict("records")
    assert (untouched["change"] == 0).all() and (untouched["reference_sd"] == 0).all()  # nor did the reference
    assert (untouched["spatial_change"] == 0).all() and (untouched["tcav_change"] == 0).all()
    assert (untouched["p_value"] == 1).all() and untouched["reason"].str.contains("no spread").all()
