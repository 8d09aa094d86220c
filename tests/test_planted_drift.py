"""A drift planted in real data, found by two real audits with the pretrained EfficientNet-Lite0.

Between two audits of one run directory, five striped textures labelled ``ladybug`` arrive (a
mislabelled batch); before, the ladybug images (horses of dotted, chequered, honeycomb and spiral
textures) show no stripes. At ``_blocks.15`` the model's ladybug logit rises along the striped
vector on striped positions, so the striped -> ladybug contribution changes. Measured with this
configuration over 14 data seeds: spatial score 0.00-0.53 before, 0.36-0.84 after (change +0.09 to
+0.84), TCAV score 0.00-0.25 before, 0.04-0.50 after (change +0.04 to +0.37); the row was
significant in 14 of 14, the smaller of its two adjusted p-values at most 0.0063 (seed 0: spatial
0.04 -> 0.62, adjusted p 2e-6). Rows of the other classes cannot change: their images, vectors and
per-image scores are the same in both audits.

Why not striped -> zebra: it is saturated. The zebra logit rises along the striped vector almost
wherever the vector fires, whatever the zebra images show (spatial score 0.96-1.00 at ``_blocks.15``
and 0.72-0.93 at ``_blocks.12`` for zebra images without stripes), so adding stripes to the zebra
class cannot move it. Why 6 random sets of 15 images and 8 images per class: the drift test is Welch
on the per-set scores of the two audits, and the per-set scores spread with the vectors. On a
similar data set with 5 images per set, the change was found in 0 of 6 seeds with 3 sets and 6 of 6
with 6 sets; with 15 images per set and 4 sets, in 13 of 14; with 5 images per class, the ladybug
class before the change sometimes has no relevant position for some vector (spatial score undefined,
only the TCAV test left).
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


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_audit_data(
    root: Path, seed: int = SEED, n_concept: int = 10, n_random: int = 30, n_per_class: int = 8
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
                "random_sets": 6,
                "images_per_set": 15,
            },
            "dataset": {"root": str(tmp_path / "data"), "target": "label"},
            "extract": {"shard_size": 16, "batch_size": 16},
            "score": {"min_images": 2},
            "execution": {"device": "cpu"},
        }
    )
    first = run_pipeline(config)
    add_striped(tmp_path, n=5)
    second = run_pipeline(config)
    assert second.extract.added == 5 and second.extract.shards_run == 1  # the new rows' shard only
    assert second.fit.fitted == 0  # same guidance, same seed: the same vectors

    drift = RunDir(config.run_dir).read_table("drift")
    assert set(drift["before"]) == {first.audit_id} and set(drift["after"]) == {second.audit_id}
    assert len(drift) == len(CLASSES)  # one layer, one concept, one row per class
    planted = drift.set_index("class_name").loc[PLANTED]
    assert planted["concept"] == "striped" and planted["significant"], planted.to_dict()
    assert planted["spatial_change"] > 0 and planted["tcav_change"] > 0, planted.to_dict()
    for statistic in ("spatial", "tcav"):  # each significant statistic moved up
        if planted[f"p_adjusted_{statistic}"] < config.score.alpha:
            assert planted[f"{statistic}_change"] > 0.05, planted.to_dict()
    assert drift.iloc[0]["class_name"] == PLANTED  # the largest change leads the table

    untouched = drift[drift["class_name"] != PLANTED]
    assert not untouched["significant"].any(), untouched.to_dict("records")
    assert (untouched["spatial_change"] == 0).all() and (untouched["tcav_change"] == 0).all()
