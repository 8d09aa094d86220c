"""Shared helpers for the flow tests: collections on disk, configs, store comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from sacv.config import parse_config

SMALL_TEST = {"images_per_concept": 4, "pseudo_concepts": 3}  # concepts of write_collection have 5 images


def write_collection(root: Path, n_per_concept: int = 5, n_per_class: int = 4, seed: int = 0) -> Path:
    """concepts/{striped,dotted,chequered}/ and data/{cat,zebra}/ with images of mixed sizes and modes."""
    from sacv.demo import textures

    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "P", "RGBA"]
    for concept in ("striped", "dotted", "chequered"):
        folder = root / "concepts" / concept
        folder.mkdir(parents=True)
        for i in range(n_per_concept):
            size = int(rng.integers(40, 90))
            image = Image.fromarray(textures.GENERATORS[concept](size, rng)).convert(modes[i % 4])
            image.save(folder / f"{concept}_{i}.png")
    for name in ("cat", "zebra"):
        folder = root / "data" / name
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            image = Image.fromarray(textures.random_texture(int(rng.integers(40, 70)), rng))
            image.resize((int(rng.integers(40, 80)), int(rng.integers(40, 80)))).save(folder / f"{name}_{i}.jpg")
    return root


def make_config(root: Path, run: str = "run", spec: str = "tests.models:small", with_concepts: bool = True, **extract):
    raw = {
        "run_dir": str(root / run),
        "model": {"spec": spec},
        "layers": ["features.0", "features.2"],
        "dataset": {"root": str(root / "data"), "target": "label"},
        "extract": {"shard_size": 4, "batch_size": 3, **extract},
    }
    if with_concepts:
        folders = (root / "concepts").iterdir() if (root / "concepts").is_dir() else []
        sizes = [len(list(d.iterdir())) for d in folders if d.is_dir()]
        n = max(2, min([SMALL_TEST["images_per_concept"], *sizes]))  # collections with fewer images per concept
        raw["concepts"] = {"root": str(root / "concepts"), **SMALL_TEST, "images_per_concept": n}
    return parse_config(raw)


def pipeline_config(root: Path, run: str = "run", solver: str = "lbfgs", **score):
    """``make_config`` for a whole small pipeline: 3 random sets of 4 images, classes of 2+ images scored."""
    config = make_config(root, run=run)
    return config.model_copy(
        update={
            "concepts": config.concepts.model_copy(update={"random_sets": 3, "images_per_set": 4}),
            "fit": config.fit.model_copy(update={"solver": solver}),
            "score": config.score.model_copy(update={"min_images": 2, **score}),
        }
    )


def store_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(run_dir / "store.zarr"), mode="r")
    return {path: np.asarray(array[...]) for path, array in _walk(root)}


def _walk(group):
    for name, array in group.arrays():
        yield name, array
    for name, sub in group.groups():
        for path, array in _walk(sub):
            yield f"{name}/{path}", array


TABLES = ("images", "rejects", "vectors", "image_scores", "contributions")
PER_RUN_COLUMNS = ("wall_s", "stamp", "added_in", "removed_in")  # wall times, file stamps, audit ids


def pipeline_raw(collection: str, run_dir: str, spec: str = "tests.models:small", dataset: dict | None = None) -> dict:
    """A small whole-pipeline config (3 random sets of 4 images, one layer) as a raw dict;
    ``collection`` is a local folder or URL made by :func:`write_collection`."""
    return {
        "run_dir": run_dir,
        "model": {"spec": spec},
        "layers": ["features.2"],
        "concepts": {"root": f"{collection}/concepts", "random_sets": 3, "images_per_set": 4, **SMALL_TEST},
        "dataset": dataset or {"root": f"{collection}/data", "target": "label"},
        "extract": {"shard_size": 4, "batch_size": 3},
        "score": {"min_images": 2},
    }


def write_manifest(collection: Path, base_url: str) -> Path:
    """manifest.csv in ``collection``: the class-folder images as ``base_url/data/...`` URLs, labels by name."""
    paths = sorted((collection / "data").rglob("*.jpg"))
    lines = ["path,label"] + [f"{base_url}/{p.relative_to(collection).as_posix()},{p.parent.name}" for p in paths]
    (collection / "manifest.csv").write_text("\n".join(lines) + "\n")
    return collection / "manifest.csv"


def run_tables(run, collection: str) -> dict:
    """Every result table of a ``RunDir``; image paths relative to ``collection``; wall times and
    what differs per run or file system by design (file stamps, audit ids) dropped."""
    out = {}
    for name in TABLES:
        table = run.read_table(name)
        for column in ("path", "mask"):
            if table is not None and column in table:
                table[column] = table[column].str.removeprefix(f"{collection}/")
        out[name] = None if table is None else table.drop(columns=[c for c in PER_RUN_COLUMNS if c in table])
    return out


def assert_same_tables(tables: dict, expected: dict) -> None:
    """Exactly equal tables (values, dtypes, row order), one assertion per table."""
    import pandas as pd

    assert set(tables) == set(expected)
    for name, table in expected.items():
        assert table is not None and tables[name] is not None, f"{name} is missing"
        pd.testing.assert_frame_equal(tables[name], table, check_exact=True, obj=name)
