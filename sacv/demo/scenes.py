"""The demo's data, generated offline with fixed seeds: concept folders, a random pool, audit scenes
with ground-truth masks, and a config for the whole pipeline.

Layout under ``out``::

    data/concepts/<concept>/<concept>_NNN.png   procedural guidance images (224 px)
    data/random/random_NNN.png                  the random pool: colour noise, blobs, photo crops
    data/audit/images/*.png                     scenes (256 px) and four bundled photos
    data/audit/masks/*_mask.png                 255 on the objects of the recorded concept
    data/audit/masks/*_distractor.png           255 on an object of another texture, when present
    data/audit/manifest.csv                     path,label,mask,mask_concept,distractor_mask,distractor_concept
    config.yaml                                 run_dir out/run, absolute paths

Scene labels are ImageNet class names: horses with stripes are ``zebra``, horses of another texture
``sorrel``, shapes one class per texture (``SHAPE_LABELS``). Objects stay inside the model's centre
crop (256 px resized to 256, cropped to 224), so masks survive preprocessing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from sacv.config import load_config
from sacv.demo import textures

LAYERS = ["_blocks.3", "_blocks.8", "_blocks.12"]
HORSE_LABELS = {"striped": "zebra"}  # any other texture: sorrel
SHAPE_LABELS = {
    "dotted": "ladybug",
    "chequered": "crossword puzzle",
    "zigzagged": "prayer rug",
    "banded": "shower curtain",
    "crosshatched": "chainlink fence",
    "honeycomb": "honeycomb",
    "spiralled": "coil",
}
PHOTO_LABELS = {"chelsea": "tabby", "coffee": "espresso", "astronaut": "space shuttle", "rocket": "missile"}
MANIFEST_COLUMNS = ["path", "label", "mask", "mask_concept", "distractor_mask", "distractor_concept"]
CONCEPT_SIZE = 224
SCENE_SIZE = 256
MARGIN = 16  # (256 - 224) / 2: objects lie inside the centre crop
DISTRACTOR_SHARE = 0.4


@dataclass(frozen=True)
class Sizes:
    concept_images: int  # per concept
    random_images: int
    scenes: int
    random_sets: int
    images_per_set: int
    # of concept_images each: disjoint when random_images >= random_sets * images_per_set + this * concept_images
    pseudo_concepts: int
    min_images: int


FULL = Sizes(
    concept_images=20, random_images=520, scenes=100, random_sets=5, images_per_set=20, pseudo_concepts=20, min_images=3
)
SMALL = Sizes(
    concept_images=8, random_images=20, scenes=24, random_sets=3, images_per_set=8, pseudo_concepts=5, min_images=2
)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent stream per part, so each part's images depend only on the seed and the sizes."""
    return np.random.default_rng([seed, *keys])


def _save(image: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path.name


def write_concepts(root: Path, n: int, seed: int) -> None:
    """``n`` images of every concept of ``textures.GENERATORS`` into ``root/<concept>/``."""
    for k, (name, generate) in enumerate(textures.GENERATORS.items()):
        rng = _rng(seed, 1, k)
        for i in range(n):
            _save(generate(CONCEPT_SIZE, rng), root / name / f"{name}_{i:03d}.png")


def write_random(root: Path, n: int, seed: int) -> None:
    rng = _rng(seed, 2)
    for i in range(n):
        _save(textures.random_texture(CONCEPT_SIZE, rng), root / f"random_{i:03d}.png")


def scene_plan(n: int) -> list[tuple[str, str]]:
    """(kind, concept) per scene: ~30% striped horses, ~15% horses of other textures, the rest
    shapes, textures taken in turn."""
    others = [c for c in textures.CONCEPTS if c != "striped"]
    zebras, sorrels = round(0.3 * n), round(0.15 * n)
    plan = [("horse", "striped")] * zebras + [("horse", others[i % len(others)]) for i in range(sorrels)]
    return plan + [("shape", others[i % len(others)]) for i in range(n - zebras - sorrels)]


def _objects(kind: str, rng: np.random.Generator) -> np.ndarray:
    """The mask of one horse, or of one or two shapes (one concept)."""
    if kind == "horse":
        return textures.horse_mask(SCENE_SIZE, rng, scale=rng.uniform(0.45, 0.65), margin=MARGIN)
    count = 1 if rng.random() < 0.7 else 2
    masks = [
        textures.shape_mask(SCENE_SIZE, rng, scale=rng.uniform(0.4, 0.7) / count**0.5, margin=MARGIN)
        for _ in range(count)
    ]
    return np.logical_or.reduce(masks)


def _distractor(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A shape at least a few pixels away from ``mask``, or None when none fits in 25 tries."""
    from scipy.ndimage import binary_dilation

    keep_out = binary_dilation(mask, iterations=4)
    for _ in range(25):
        candidate = textures.shape_mask(SCENE_SIZE, rng, scale=rng.uniform(0.25, 0.4), margin=MARGIN)
        if not (candidate & keep_out).any():
            return candidate
    return None


def make_scene(
    kind: str, concept: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str | None, np.ndarray | None]:
    """A background crop with objects of ``concept`` and perhaps a distractor of another texture.

    Returns (image, mask, distractor concept, distractor mask); the two masks do not touch."""
    image = textures.background(SCENE_SIZE, rng)
    mask = _objects(kind, rng)
    other, other_mask = None, None
    if rng.random() < DISTRACTOR_SHARE:
        other_mask = _distractor(mask, rng)
        if other_mask is not None:
            other = str(rng.choice([c for c in textures.CONCEPTS if c != concept]))
            image[other_mask] = textures.GENERATORS[other](SCENE_SIZE, rng)[other_mask]
    image[mask] = textures.GENERATORS[concept](SCENE_SIZE, rng)[mask]
    return image, mask, other, other_mask


def _label(kind: str, concept: str) -> str:
    return HORSE_LABELS.get(concept, "sorrel") if kind == "horse" else SHAPE_LABELS[concept]


def write_audit(root: Path, n: int, seed: int) -> pd.DataFrame:
    """``n`` scenes plus the bundled photos into ``root/images`` and ``root/masks``; the manifest."""
    rows = []
    for i, (kind, concept) in enumerate(scene_plan(n)):
        image, mask, other, other_mask = make_scene(kind, concept, _rng(seed, 3, i))
        stem = f"{kind}_{i:03d}_{concept}"
        row = {
            "path": f"images/{_save(image, root / 'images' / f'{stem}.png')}",
            "label": _label(kind, concept),
            "mask": f"masks/{_save(mask.astype(np.uint8) * 255, root / 'masks' / f'{stem}_mask.png')}",
            "mask_concept": concept,
            "distractor_mask": None,
            "distractor_concept": other,
        }
        if other_mask is not None:
            row["distractor_mask"] = (
                f"masks/{_save(other_mask.astype(np.uint8) * 255, root / 'masks' / f'{stem}_distractor.png')}"
            )
        rows.append(row)
    for name, label in PHOTO_LABELS.items():
        rows.append(
            {"path": f"images/{_save(textures.bundled(name), root / 'images' / f'photo_{name}.png')}", "label": label}
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest.to_csv(root / "manifest.csv", index=False)
    return manifest


def demo_config(out: Path, sizes: Sizes) -> dict:
    """The pipeline config of the demo (absolute paths)."""
    data = out / "data"
    return {
        "run_dir": str(out / "run"),
        "model": {"spec": "efficientnet_lite0"},
        "layers": LAYERS,
        "concepts": {
            "root": str(data / "concepts"),
            "random_pool": str(data / "random"),
            "random_sets": sizes.random_sets,
            "images_per_set": sizes.images_per_set,
            "images_per_concept": sizes.concept_images,
            "pseudo_concepts": sizes.pseudo_concepts,
        },
        "dataset": {"manifest": str(data / "audit" / "manifest.csv"), "target": "label"},
        "fit": {"solver": "auto"},
        "score": {"min_images": sizes.min_images, "correction": "bh"},  # exploratory audit: false-discovery rate
        "execution": {"device": "auto"},
    }


def write_demo_data(out: Path, small: bool = False, seed: int = 0) -> Path:
    """Write ``out/data/`` (replacing an old one) and ``out/config.yaml``; return the config's path."""
    out = Path(out).resolve()
    sizes = SMALL if small else FULL
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    write_concepts(data / "concepts", sizes.concept_images, seed)
    write_random(data / "random", sizes.random_images, seed)
    write_audit(data / "audit", sizes.scenes, seed)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(demo_config(out, sizes), sort_keys=False))
    load_config(path)  # raises ConfigError if the demo wrote something the pipeline refuses
    return path
