"""Localisation metrics on hand-made maps, and evaluate_run on a tiny real pipeline run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sacv.config import parse_config
from sacv.extract.catalog import IMAGE_COLUMNS, ImageCatalog
from sacv.score.localisation import LOCALISATION_COLUMNS, evaluate_run, image_metrics, masked_images


def metric(name: str, map_, mask, stride: int = 0, distractor=None) -> float:
    return image_metrics(map_, mask, stride, distractor)[name]


def pointing_hit(map_, mask, stride: int) -> bool:
    return metric("pointing_game", map_, mask, stride) == 1.0


def mask_auc(map_, mask) -> float:
    return metric("mask_auc", map_, mask)


def energy_in_mask(map_, mask) -> float:
    return metric("energy_in_mask", map_, mask)


def distractor_ratio(map_, mask, distractor) -> float:
    return metric("distractor_ratio", map_, mask, distractor=distractor)


def box(shape=(16, 16), rows=slice(4, 8), cols=slice(4, 8)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def peak(shape, i, j) -> np.ndarray:
    m = np.zeros(shape)
    m[i, j] = 1.0
    return m


def test_pointing_hit_inside_outside_and_dilation_by_one_stride():
    mask = box()
    assert pointing_hit(peak((16, 16), 5, 5), mask, stride=0)
    assert not pointing_hit(peak((16, 16), 12, 12), mask, stride=0)
    assert pointing_hit(peak((16, 16), 5, 7 + 2), mask, stride=2)  # one stride right of the mask
    assert not pointing_hit(peak((16, 16), 5, 7 + 4), mask, stride=2)  # two strides right
    # a feature map (4, 4) of stride 4 upsampled to (16, 16): cell column 0 is the mask
    mask = box(rows=slice(0, 16), cols=slice(0, 4))
    assert pointing_hit(peak((4, 4), 1, 0), mask, stride=4)
    assert pointing_hit(peak((4, 4), 1, 1), mask, stride=4)  # one cell (= one stride) away
    assert not pointing_hit(peak((4, 4), 1, 2), mask, stride=4)  # two cells away


def test_mask_auc_known_values():
    mask = box()
    assert mask_auc(mask.astype(float), mask) == pytest.approx(1.0)
    assert mask_auc(-mask.astype(float), mask) == pytest.approx(0.0)
    assert mask_auc(np.ones((16, 16)), mask) == pytest.approx(0.5)
    assert mask_auc(np.ones((4, 4)), mask) == pytest.approx(0.5)  # upsampled constant
    assert math.isnan(mask_auc(np.ones((16, 16)), np.zeros((16, 16), bool)))
    assert math.isnan(mask_auc(np.ones((16, 16)), np.ones((16, 16), bool)))


def test_energy_in_mask_known_values():
    mask = box()
    assert energy_in_mask(mask * 3.0 - (~mask) * 2.0, mask) == pytest.approx(1.0)  # negatives do not count
    half = box(rows=slice(4, 8), cols=slice(4, 12)) * 1.0  # 16 pixels in the mask, 16 outside
    assert energy_in_mask(half, mask) == pytest.approx(0.5)
    assert math.isnan(energy_in_mask(-np.ones((16, 16)), mask))


def test_distractor_ratio_known_values():
    mask, distractor = box(), box(rows=slice(10, 16), cols=slice(0, 16))  # sizes differ: per-pixel means
    m = mask * 2.0 + distractor * 1.0
    assert distractor_ratio(m, mask, distractor) == pytest.approx(2.0)
    assert distractor_ratio(m - distractor * 5.0, mask, distractor) == math.inf  # nothing positive on the distractor
    assert distractor_ratio(distractor * 1.0, mask, distractor) == 0.0
    assert math.isnan(distractor_ratio(-np.ones((16, 16)), mask, distractor))
    assert math.isnan(distractor_ratio(m, mask, np.zeros((16, 16), bool)))


def test_no_masks_is_an_error_that_says_how_to_add_them(tmp_path):
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": ["a.png"], "label": [0]}).to_csv(manifest, index=False)
    with pytest.raises(ValueError, match="`mask` column"):
        masked_images(ImageCatalog(pd.DataFrame(columns=IMAGE_COLUMNS)), str(manifest), {"striped"})
    with pytest.raises(ValueError, match="no masks"):
        masked_images(ImageCatalog(pd.DataFrame(columns=IMAGE_COLUMNS)), None, {"striped"})


def write_scenes(root: Path) -> Path:
    """9 scenes (3 per concept; every second one with a distractor of another concept), one scene
    of an unfitted concept and one image without a mask."""
    from sacv.demo import textures

    rng = np.random.default_rng(1)
    folder = root / "scenes"
    folder.mkdir()
    concepts = ["striped", "dotted", "chequered"]
    rows = []
    for i in range(10):
        concept = concepts[i % 3] if i < 9 else "striped"
        image, mask = textures.scene(48, concept, rng)
        row = {
            "path": f"s{i}.png",
            "label": ["cat", "zebra"][i % 2],
            "mask": f"s{i}_mask.png",
            "mask_concept": concept if i < 9 else "furry",
            "distractor_mask": None,
            "distractor_concept": None,
        }
        if i % 2 == 0:
            other = concepts[(i + 1) % 3]
            distractor = np.zeros_like(mask)
            distractor[28:44, 4:44] = True
            distractor &= ~mask
            image = np.where(distractor[..., None], textures.GENERATORS[other](48, rng), image)
            Image.fromarray(distractor.astype(np.uint8) * 255).save(folder / f"s{i}_distractor.png")
            row |= {"distractor_mask": f"s{i}_distractor.png", "distractor_concept": other}
        Image.fromarray(image).save(folder / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"s{i}_mask.png")
        rows.append(row)
    Image.fromarray(textures.random_texture(48, rng)).save(folder / "plain.png")
    rows.append({"path": "plain.png", "label": "dog"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def localised(tmp_path_factory, prefect):
    from flows.pipeline import run_pipeline
    from tests.flow_helpers import SMALL_TEST, write_collection

    root = write_collection(tmp_path_factory.mktemp("localised"), n_per_concept=5, n_per_class=1)
    config = parse_config(
        {
            "run_dir": str(root / "run"),
            "model": {"spec": "tests.models:small"},
            "layers": ["features.0", "features.2"],
            "concepts": {"root": str(root / "concepts"), "random_sets": 3, "images_per_set": 4, **SMALL_TEST},
            "dataset": {"manifest": str(write_scenes(root)), "target": "label"},
            "extract": {"shard_size": 4, "batch_size": 4},
            "fit": {"solver": "lbfgs"},
            "score": {"min_images": 2},
        }
    )
    run_pipeline(config)
    return config, evaluate_run(config.run_dir)


def test_evaluate_run_table_rows_columns_and_ranges(localised):
    config, table = localised
    assert list(table.columns) == LOCALISATION_COLUMNS
    pd.testing.assert_frame_equal(pd.read_parquet(Path(config.run_dir) / "tables/localisation.parquet"), table)
    assert len(table) == 2 * 3 * 3  # layers x mask concepts x methods; "furry" and the unmasked image are left out
    assert list(table["layer"].unique()) == config.layers
    assert set(table["method"]) == {"sacv", "tcav", "random"}
    assert (table["n_images"] == 3).all()
    assert set(table["n_distractor"]) == {1, 2}  # scenes 0, 2, 4, 6, 8 have one
    for column in ("pointing_game", "mask_auc", "energy_in_mask", "mask_share", "hit_share"):
        assert table[column].between(0, 1).all(), column
    assert (table["distractor_ratio"] >= 0).all()
    assert (table["hit_share"] >= table["mask_share"]).all()
    strides = table.groupby("layer")[["stride", "map_h", "map_w"]].first()
    assert strides.loc["features.0"].tolist() == [1, 32, 32] and strides.loc["features.2"].tolist() == [2, 16, 16]


def test_random_baseline_points_at_the_mask_as_often_as_its_area(localised):
    _, table = localised
    random = table[table["method"] == "random"]
    for _, part in random.groupby("layer"):
        weights = part["n_images"]
        got = np.average(part["pointing_game"], weights=weights)
        assert got == pytest.approx(np.average(part["hit_share"], weights=weights), abs=0.15)
        assert np.average(part["mask_auc"], weights=weights) == pytest.approx(0.5, abs=0.05)
