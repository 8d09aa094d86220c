"""Localisation: do concept maps point at the object that shows the concept?

Dataset images with a mask (manifest columns ``mask`` and ``mask_concept``: which concept's texture
the masked object shows) are scored against three maps of that concept per layer:

- ``sacv``: ``S_k`` with the mean of the concept's unit vectors over its random sets;
- ``tcav``: one whole-layer TCAV vector, a logistic regression on the flattened (H*W*C) guidance
  activations, reshaped to (H, W, C) and projected per position: ``map[i, j] = f[i, j] · w[i, j]``;
- ``random``: seeded standard-normal maps of the same shape (the chance baseline, ``n_random`` draws).

Maps (h, w) are upsampled bilinearly to the mask, which is resized and cropped like the model input
(``Preprocessing.geometry``, nearest neighbour), so map and mask line up. Every metric below is
invariant to a positive scale of the map.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import binary_dilation
from sklearn.linear_model import LogisticRegression

from sacv.config import parse_config
from sacv.extract.catalog import ImageCatalog
from sacv.io import storage
from sacv.io.rundir import RunDir
from sacv.method.maps import concept_maps, upsample_map
from sacv.method.models import Preprocessing
from sacv.method.vectors import mann_whitney_auc

METHODS = ("sacv", "tcav", "random")
LOCALISATION_COLUMNS = [
    "layer",
    "concept",
    "method",
    "n_images",
    "n_distractor",
    "pointing_game",
    "mask_auc",
    "energy_in_mask",
    "distractor_ratio",
    "mask_share",
    "hit_share",
    "stride",
    "map_h",
    "map_w",
]
BATCH = 64  # dataset images read from the store at a time


def _up(map_, mask: np.ndarray) -> np.ndarray:
    """(h, w) map -> (H, W) float64 at the mask's resolution."""
    return upsample_map(np.asarray(map_, dtype=np.float32), mask.shape).astype(np.float64)


def dilate(mask: np.ndarray, stride: int) -> np.ndarray:
    """(H, W) bool mask grown by ``stride`` pixels in every direction (square structuring element)."""
    return binary_dilation(mask, structure=np.ones((2 * stride + 1, 2 * stride + 1), bool)) if stride > 0 else mask


def _hit(up: np.ndarray, dilated: np.ndarray) -> bool:
    return bool(dilated[np.unravel_index(np.argmax(up), up.shape)])


def _energy(positive: np.ndarray, mask: np.ndarray) -> float:
    total = positive.sum()
    return float(positive[mask].sum() / total) if total > 0 else float("nan")


def _ratio(positive: np.ndarray, mask: np.ndarray, distractor: np.ndarray) -> float:
    if not mask.any() or not distractor.any():
        return float("nan")
    on_object, on_distractor = positive[mask].mean(), positive[distractor].mean()
    if on_distractor > 0:
        return float(on_object / on_distractor)
    return float("inf") if on_object > 0 else float("nan")


def image_metrics(
    map_, mask: np.ndarray, stride: int, distractor: np.ndarray | None = None, dilated: np.ndarray | None = None
) -> dict[str, float]:
    """The four metrics of one (h, w) map against an (H, W) bool mask; the map is upsampled once.

    - ``pointing_game``: 1.0 when the arg-max pixel of the upsampled map lies in the mask dilated by
      one feature stride (``stride`` pixels; ties go to the first pixel in row-major order), else 0.0;
    - ``mask_auc``: ROC AUC of the upsampled pixel values, mask (positive) vs rest; NaN when the mask
      is empty or covers every pixel; 1 = every mask pixel above every other, 0.5 = chance;
    - ``energy_in_mask``: share of the positive mass ``sum(max(m, 0))`` inside the mask; NaN when the
      map has no positive value;
    - ``distractor_ratio``: mean positive value over the concept's object ÷ over the ``distractor``
      object (per-pixel means, so object sizes do not matter); NaN without a distractor, when either
      mask is empty or neither object has positive mass; ``inf`` when only the concept's object has,
      0 when only the distractor has.

    Pass ``dilated = dilate(mask, stride)`` when scoring many maps on one mask.
    """
    up = _up(map_, mask)
    positive = np.maximum(up, 0)
    return {
        "pointing_game": float(_hit(up, dilate(mask, stride) if dilated is None else dilated)),
        "mask_auc": mann_whitney_auc(up.ravel(), mask.ravel()),
        "energy_in_mask": _energy(positive, mask),
        "distractor_ratio": float("nan") if distractor is None else _ratio(positive, mask, distractor),
    }


def load_mask(path: str, preprocessing: Preprocessing) -> np.ndarray:
    """A mask file (non-zero = object) -> (H, W) bool at the model input (resize and crop, nearest)."""
    with storage.open_url(path, "rb") as handle:
        image = Image.open(handle).convert("L")
        image.load()
    return np.asarray(preprocessing.geometry(image, Image.Resampling.NEAREST)) > 127


def _resolve(manifest: str, path) -> str | None:
    """A manifest entry resolved against the manifest's folder, exactly as ``sacv.extract.catalog`` does."""
    if pd.isna(path):
        return None
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    return path if "://" in path or path.startswith("/") else f"{base}/{path}"


def masked_images(catalog: ImageCatalog, manifest: str | None, concepts: set[str]) -> pd.DataFrame:
    """Dataset rows of images.parquet with a mask whose ``mask_concept`` has fitted vectors, joined
    with the manifest on the resolved path: columns row, path, mask, mask_concept, distractor_mask."""
    how = (
        "add a `mask` column (object mask files, non-zero = object) and a `mask_concept` column (the "
        "concept the masked object shows) to the dataset manifest (dataset.manifest), then extract again"
    )
    if manifest is None:
        raise ValueError(f"the dataset has no masks (it comes from class folders, not a manifest); {how}")
    table = (pd.read_parquet if manifest.endswith(".parquet") else pd.read_csv)(manifest)
    if "mask" not in table.columns or table["mask"].isna().all() or "mask_concept" not in table.columns:
        raise ValueError(f"the dataset manifest {manifest} has no masks with a mask concept; {how}")
    joined = pd.DataFrame(
        {
            "path": [_resolve(manifest, p) for p in table["path"]],
            "mask_concept": table["mask_concept"],
            "distractor_mask": [
                _resolve(manifest, p) for p in table.get("distractor_mask", pd.Series([None] * len(table)))
            ],
        }
    )
    images = catalog.frame
    images = images[(images["group"] == "dataset") & images["mask"].notna()].merge(joined, on="path")
    images = images[images["mask_concept"].isin(concepts)]
    images = images.drop_duplicates(["row", "mask", "mask_concept", "distractor_mask"])
    return images[["row", "path", "mask", "mask_concept", "distractor_mask"]].sort_values("row").reset_index(drop=True)


def tcav_vector(run: RunDir, catalog: ImageCatalog, layer: str, concept: str) -> np.ndarray:
    """Whole-layer TCAV weights (H, W, C), unit norm, pointing towards the concept.

    Positives: every image of the concept; negatives: every image in any of the concept's random sets
    (the union of the ``neg`` sides of its jobs in fits/plan.json). Logistic regression on the
    flattened guidance activations: balanced class weights, C = 1, ``random_state=0``.
    """
    jobs = [
        j for j in run.read_fit_plan() if j["layer"] == layer and j["concept"] == concept and j["kind"] == "concept"
    ]
    positives, negatives = set(jobs[0]["pos"]), set().union(*(j["neg"] for j in jobs)) - set(jobs[0]["pos"])
    row_of = catalog.row_of
    positive_rows = set(row_of(sorted(positives)).tolist())
    rows = sorted(positive_rows | set(row_of(sorted(negatives)).tolist()))
    act = run.open_zarr("r")[f"guidance/{layer}/act"]
    features = np.asarray(act.get_orthogonal_selection((rows,)), dtype=np.float32)  # (n, H, W, C)
    labels = np.array([int(r in positive_rows) for r in rows])
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000, random_state=0)
    model.fit(features.reshape(len(rows), -1), labels)
    weights = model.coef_[0].reshape(features.shape[1:])
    return weights / np.linalg.norm(weights)


def evaluate_run(run_uri: str, n_random: int = 20, seed: int = 0) -> pd.DataFrame:
    """Localisation metrics of a fitted run, aggregated per (layer, concept, method); also written
    to ``tables/localisation.parquet``.

    Per image (only against its own mask concept): pointing hit, mask AUC, energy in mask and, with
    a distractor mask, the distractor ratio; the random baseline averages ``n_random`` draws per image
    (the median for the ratio). Aggregates: ``pointing_game``, ``mask_auc``, ``energy_in_mask`` are
    means over images (NaNs skipped), ``distractor_ratio`` the median over images with a distractor.
    ``mask_share``/``hit_share``: mean share of input pixels in the mask / the stride-dilated mask
    (``hit_share`` = expected pointing game of a uniformly placed peak). Images whose mask is empty
    after the crop are skipped. Columns: ``LOCALISATION_COLUMNS``.
    """
    run = RunDir(run_uri)
    config = parse_config(run.read_run_record()["config"])
    catalog = ImageCatalog.read(run)
    store = run.open_zarr("r")
    preprocessing = Preprocessing.from_dict(store.attrs["preprocessing"])
    vectors = run.read_table("vectors")
    vectors = vectors[vectors["kind"] == "concept"]
    images = masked_images(catalog, config.dataset.manifest if config.dataset else None, set(vectors["concept"]))
    masks = {
        p: load_mask(p, preprocessing) for p in pd.concat([images["mask"], images["distractor_mask"]]).dropna().unique()
    }
    images = images[[masks[p].any() for p in images["mask"]]]
    if images.empty:
        raise ValueError(
            "no dataset image has a non-empty mask of a concept with fitted vectors; check mask_concept names"
        )
    concepts = sorted(images["mask_concept"].unique())
    records = []
    for layer in config.layers:
        fitted = vectors[vectors["layer"] == layer]
        v = store[f"vectors/{layer}/v"][...]
        sacv_vectors = np.stack(
            [v[fitted.loc[fitted["concept"] == k, "vector_row"].to_numpy()].mean(axis=0) for k in concepts]
        )
        tcav = {k: tcav_vector(run, catalog, layer, k) for k in concepts}
        act = store[f"dataset/{layer}/act"]
        for start in range(0, len(images), BATCH):
            batch = images.iloc[start : start + BATCH]
            features = np.asarray(act.get_orthogonal_selection((batch["row"].to_numpy(int),)), dtype=np.float32)
            s_k = concept_maps(features, sacv_vectors).s_k  # (n, K, h, w)
            for f, s, image in zip(features, s_k, batch.itertuples()):
                mask, k = masks[image.mask], concepts.index(image.mask_concept)
                distractor = masks.get(image.distractor_mask)
                h, w = s.shape[1:]
                stride = max(1, round(mask.shape[1] / w))
                dilated = dilate(mask, stride)
                draws = np.random.default_rng([seed, image.row]).standard_normal((n_random, h, w))
                random = pd.DataFrame([image_metrics(d, mask, stride, distractor, dilated) for d in draws])
                maps = {"sacv": s[k], "tcav": np.einsum("hwc,hwc->hw", f, tcav[image.mask_concept])}
                per_method = {m: image_metrics(maps[m], mask, stride, distractor, dilated) for m in ("sacv", "tcav")}
                per_method["random"] = {
                    **random.drop(columns="distractor_ratio").mean().to_dict(),
                    "distractor_ratio": random["distractor_ratio"].median(),
                }
                common = {
                    "layer": layer,
                    "concept": image.mask_concept,
                    "row": image.row,
                    "has_distractor": distractor is not None,
                    "mask_share": mask.mean(),
                    "hit_share": dilated.mean(),
                    "stride": stride,
                    "map_h": h,
                    "map_w": w,
                }
                records += [{**common, "method": m, **per_method[m]} for m in METHODS]
    per_image = pd.DataFrame(records)
    table = (
        per_image.groupby(["layer", "concept", "method"], sort=False)
        .agg(
            n_images=("row", "size"),
            n_distractor=("has_distractor", "sum"),
            pointing_game=("pointing_game", "mean"),
            mask_auc=("mask_auc", "mean"),
            energy_in_mask=("energy_in_mask", "mean"),
            distractor_ratio=("distractor_ratio", "median"),
            mask_share=("mask_share", "mean"),
            hit_share=("hit_share", "mean"),
            stride=("stride", "first"),
            map_h=("map_h", "first"),
            map_w=("map_w", "first"),
        )
        .reset_index()
    )
    order = {
        "layer": {name: i for i, name in enumerate(config.layers)},
        "method": {m: i for i, m in enumerate(METHODS)},
    }
    table = table.sort_values(
        ["layer", "concept", "method"], key=lambda c: c.map(order[c.name]) if c.name in order else c
    )
    table = table[LOCALISATION_COLUMNS].reset_index(drop=True)
    run.write_table("localisation", table)
    return table
