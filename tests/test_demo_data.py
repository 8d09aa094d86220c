"""The demo's generated data: folders, manifest, masks, config, and determinism (no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sacv.config import load_config
from sacv.demo import textures
from sacv.demo.scenes import MANIFEST_COLUMNS, PHOTO_LABELS, write_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out, small=True, seed=0)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(Image.open(path))
    assert mask.dtype == np.uint8 and mask.ndim == 2 and mask.shape == size[::-1]
    assert set(np.unique(mask)) <= {0, 255} and mask.any()
    return mask > 0


def test_folders_of_concepts_random_pool_and_audit(demo):
    data = demo / "data"
    assert sorted(p.name for p in (data / "concepts").iterdir()) == sorted(textures.CONCEPTS)
    assert len(textures.CONCEPTS) >= 7
    for folder in (data / "concepts").iterdir():
        assert len(list(folder.glob("*.png"))) == 8
    assert len(list((data / "random").glob("*.png"))) == 20
    assert (data / "audit" / "manifest.csv").is_file()


def test_manifest_rows_decode_and_masks_are_binary_and_disjoint(demo):
    audit = demo / "data" / "audit"
    manifest = pd.read_csv(audit / "manifest.csv")
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 24 + len(PHOTO_LABELS)
    assert manifest["label"].notna().all()
    assert (manifest["label"] == "zebra").sum() >= 5
    for row in manifest.itertuples():
        with Image.open(audit / row.path) as image:
            image.load()
            size = image.size
        if pd.isna(row.mask):
            assert pd.isna(row.mask_concept) and pd.isna(row.distractor_mask)
            continue
        assert row.mask_concept in textures.CONCEPTS
        mask = _mask(audit / row.mask, size)
        if not pd.isna(row.distractor_mask):
            assert row.distractor_concept in textures.CONCEPTS and row.distractor_concept != row.mask_concept
            assert not (mask & _mask(audit / row.distractor_mask, size)).any()
    assert manifest["distractor_mask"].notna().any()


def test_labels_are_model_classes_and_the_config_loads(demo):
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    from sacv.extract.image_sources import match_class

    for label in pd.read_csv(demo / "data" / "audit" / "manifest.csv")["label"].unique():
        match_class(label, list(_IMAGENET_CATEGORIES))
    config = load_config(demo / "config.yaml")
    assert config.run_dir == str(demo.resolve() / "run")
    assert config.concepts.random_pool == str(demo.resolve() / "data" / "random")
    assert config.layers == ["_blocks.3", "_blocks.8", "_blocks.12"]
    concepts = config.concepts
    assert (concepts.random_sets, concepts.images_per_set, concepts.pseudo_concepts) == (3, 8, 5)
    assert concepts.images_per_concept == 8 and config.score.min_images == 2  # every image of a folder of 8 is fitted


def test_the_full_demo_draws_disjoint_random_sets_and_one_family_of_pseudo_concepts(tmp_path):
    """The full demo's sizes, planned on an images table of that many images: the random pool holds
    the random sets and the pseudo-concepts without sharing an image (FULL.random_images is sized for it)."""
    from sacv.config import parse_config
    from sacv.demo.scenes import FULL, LAYERS, demo_config
    from sacv.extract.catalog import IMAGE_COLUMNS
    from sacv.fit.fit_plan import plan_jobs
    from sacv.io.zarr_store import store_identity

    for folder in ("concepts", "random"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    config = parse_config({**demo_config(tmp_path, FULL), "dataset": None})  # the fit plan reads no dataset
    members = [(f"{k}_{i}", "concept", k) for k in textures.CONCEPTS for i in range(FULL.concept_images)]
    members += [(f"random_{i}", "random", "random") for i in range(FULL.random_images)]
    images = pd.DataFrame(
        [
            {"image_id": i, "path": f"/x/{i}.png", "group": "guidance", "role": role, "concept": k, "status": "ok"}
            for i, role, k in members
        ],
        columns=IMAGE_COLUMNS,
    )
    identity = store_identity("demo", "0" * 64, {}, {layer: [7, 7, 8] for layer in LAYERS}, "float16")
    jobs = [j for j in plan_jobs(images, config, identity) if j["layer"] == LAYERS[0]]
    concept = [j for j in jobs if j["kind"] == "concept"]
    pseudo = [j for j in jobs if j["kind"] == "pseudo"]
    assert len(concept) == len(textures.CONCEPTS) * FULL.random_sets
    assert len(pseudo) == FULL.pseudo_concepts * FULL.random_sets
    assert {j["concept"] for j in pseudo} == {f"pseudo_{p}" for p in range(FULL.pseudo_concepts)}  # one family
    randoms = {j["random_set"]: j["neg"] for j in concept if j["concept"] == "striped"}
    family = {j["concept"]: j["pos"] for j in pseudo}
    assert all(len(j["pos"]) == FULL.concept_images for j in jobs)  # nothing dropped from a pseudo-concept
    assert all(j["neg"] == randoms[j["random_set"]] for j in jobs)  # every concept: the same random sets
    sets = [*randoms.values(), *family.values()]
    assert len(set().union(*map(set, sets))) == sum(map(len, sets))  # disjoint
    assert all(i.startswith("random_") for s in sets for i in s)


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    write_demo_data(tmp_path / "again", small=True, seed=0)
    write_demo_data(tmp_path / "other", small=True, seed=1)
    first = _files(demo / "data")
    assert _files(tmp_path / "again" / "data") == first
    other = _files(tmp_path / "other" / "data")
    assert other.keys() != first.keys() or any(other[k] != first[k] for k in first)
    config = (demo / "config.yaml").read_text().replace(str(demo.resolve()), "OUT")
    assert (tmp_path / "again" / "config.yaml").read_text().replace(
        str((tmp_path / "again").resolve()), "OUT"
    ) == config
