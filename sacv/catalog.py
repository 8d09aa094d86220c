"""Image collections -> the images and rejects tables, and the shard plan.

Two groups of images go into the store:
- ``guidance``: concept folders (role ``concept``, concept = folder name) and, if configured, a
  separate random pool (role ``random``);
- ``dataset``: the audit images (role ``dataset``), from class folders or a manifest.

Every file is read and hashed (``image_id``) while scanning, and its header checked (type, size
limits) without decoding pixels; files of unsupported types, unreadable files and bad headers go
to the rejects table with their stage and reason. Pixel data is decoded once, by the extraction
shard that owns the image; a shard that cannot decode an image quarantines it (status
``rejected``, recorded in the rejects table by ``sacv.extraction.record_shard_rejects``), and later
scans keep it rejected without trying again until its content changes. Within a group, each distinct image gets one store
row (duplicates under other names point to the same row), ordered by (concept/label, image_id) so
that renaming a file changes no row. Rows are cut into shards of ``shard_size`` = Zarr chunks.
"""

from __future__ import annotations

import difflib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sacv import storage
from sacv.config import ConceptsConfig, DatasetConfig
from sacv.images import IMAGE_EXTENSIONS, ImageRejected, check_supported, image_id, list_files, probe_image, read_bytes
from sacv.rundir import RunDir

IMAGE_COLUMNS = ["image_id", "path", "group", "role", "concept", "label", "mask", "row", "shard", "status"]
REJECT_COLUMNS = ["path", "group", "stage", "reason", "image_id"]  # image_id: set for rejects found after hashing


@dataclass(frozen=True)
class Candidate:
    path: str
    group: str  # guidance | dataset
    role: str  # concept | random | dataset
    concept: str | None = None
    label: int | None = None
    mask: str | None = None


def _subfolders(root: str) -> list[str]:
    fs, base = storage.url_to_fs(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"folder {root} does not exist; check the path in the config")
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False) if fs.isdir(p))


def concept_candidates(cfg: ConceptsConfig) -> list[Candidate]:
    """One candidate per image of each concept folder, plus the random pool if it is separate."""
    folders = _subfolders(cfg.root)
    names = cfg.names or folders
    missing = [n for n in names if n not in folders]
    if missing:
        close = {n: difflib.get_close_matches(n, folders, n=3) for n in missing}
        raise ValueError(f"concept folders not found under {cfg.root}: {close} (name: close folder names)")
    if cfg.random_pool is None and len(folders) < 2:
        raise ValueError("random sets need other concept folders or a `concepts.random_pool` folder")
    root = cfg.root.rstrip("/")
    out = [Candidate(p, "guidance", "concept", concept=f) for f in folders for p in list_files(f"{root}/{f}")]
    if cfg.random_pool is not None:
        out += [Candidate(p, "guidance", "random", concept="random") for p in list_files(cfg.random_pool)]
    empty = [n for n in names if not any(c.concept == n and c.path.lower().endswith(IMAGE_EXTENSIONS) for c in out)]
    if empty:
        raise ValueError(f"concept folders with no images: {empty}; add images or remove them from concepts.names")
    return out


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


def match_class(folder: str, class_names: list[str]) -> int:
    """A class folder name -> class index: an index, or a class name (case, '_' and '-' ignored)."""
    if folder.isdigit() and int(folder) < len(class_names):
        return int(folder)
    lookup = {_normalise(n): i for i, n in enumerate(class_names)}
    if _normalise(folder) in lookup:
        return lookup[_normalise(folder)]
    close = difflib.get_close_matches(_normalise(folder), list(lookup), n=5)
    raise ValueError(
        f"class folder {folder!r} matches no class of the model; close class names: {close}. "
        "Rename the folder to a class name or its index."
    )


def dataset_candidates(cfg: DatasetConfig, class_names: list[str]) -> list[Candidate]:
    if (cfg.root is None) == (cfg.manifest is None):
        raise ValueError("give exactly one of dataset.root (class folders) or dataset.manifest (CSV/Parquet)")
    if cfg.root is not None:
        root = cfg.root.rstrip("/")
        return [
            Candidate(p, "dataset", "dataset", label=match_class(folder, class_names))
            for folder in _subfolders(cfg.root)
            for p in list_files(f"{root}/{folder}")
        ]
    reader = pd.read_parquet if cfg.manifest.endswith(".parquet") else pd.read_csv
    table = reader(cfg.manifest, storage_options=storage.options_for(cfg.manifest) or None)
    if "path" not in table.columns:
        raise ValueError(f"manifest {cfg.manifest} has no 'path' column (columns: {list(table.columns)})")
    base = cfg.manifest.rsplit("/", 1)[0] if "/" in cfg.manifest else "."

    def resolve(p):
        return None if pd.isna(p) else (p if "://" in p or p.startswith("/") else f"{base}/{p}")

    labels = table["label"] if "label" in table.columns else pd.Series([None] * len(table))
    masks = table["mask"] if "mask" in table.columns else pd.Series([None] * len(table))
    out = []
    for path, label, mask in zip(table["path"], labels, masks):
        if pd.isna(label):
            label = None
        elif not str(label).isdigit():
            label = match_class(str(label), class_names)
        out.append(Candidate(resolve(path), "dataset", "dataset", label=None if label is None else int(label), mask=resolve(mask)))
    return out


def _check(candidate: Candidate, max_pixels: int, min_size: int) -> tuple[Candidate, str | None, ImageRejected | None]:
    """Type, bytes, content id and header of one candidate (no pixel decoding)."""
    try:
        check_supported(candidate.path)
        data = read_bytes(candidate.path)
        probe_image(data, max_pixels=max_pixels, min_size=min_size)
        return candidate, image_id(data), None
    except ImageRejected as rejected:
        return candidate, None, rejected


def scan(
    candidates: list[Candidate],
    shard_size: int,
    max_pixels: int,
    min_size: int,
    threads: int = 4,
    known_rejects: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read, hash and check every candidate; return (images, rejects) tables with rows and shards.

    ``known_rejects``: the previous rejects table; an image whose (path, image_id) a shard could not
    decode before keeps its row with status ``rejected`` and its reject row, and is not tried again.
    """
    known = {}
    if known_rejects is not None and "image_id" in known_rejects.columns:
        decode = known_rejects[known_rejects["image_id"].notna()]
        known = {(p, i): (s, r) for p, i, s, r in zip(decode["path"], decode["image_id"], decode["stage"], decode["reason"])}
    rows, rejects = [], []
    with ThreadPoolExecutor(threads) as pool:
        for candidate, content_id, rejected in pool.map(lambda c: _check(c, max_pixels, min_size), candidates):
            if rejected is not None:
                rejects.append({"path": candidate.path, "group": candidate.group, "stage": rejected.stage,
                                "reason": rejected.reason, "image_id": None})
                continue
            rows.append({**candidate.__dict__, "image_id": content_id})
            if (candidate.path, content_id) in known:
                stage, reason = known[candidate.path, content_id]
                rejects.append({"path": candidate.path, "group": candidate.group, "stage": stage,
                                "reason": reason, "image_id": content_id})
    images = pd.DataFrame(rows, columns=[c for c in IMAGE_COLUMNS if c not in ("row", "shard", "status")])
    images["label"] = images["label"].astype("Int64")
    images = images.sort_values(["group", "concept", "label", "image_id", "path"], na_position="first", kind="stable")
    images["status"] = "ok"
    images["row"] = pd.array([pd.NA] * len(images), dtype="Int64")
    for group, part in images.groupby("group", sort=True):
        first = ~part.duplicated("image_id")
        row_of = {image_id: r for r, image_id in enumerate(part.loc[first, "image_id"])}
        images.loc[part.index, "row"] = part["image_id"].map(row_of).astype("Int64")
        images.loc[part.index[~first.to_numpy()], "status"] = "duplicate"
    images["shard"] = (images["row"] // shard_size).astype("Int64")
    quarantined = {(r["path"], r["image_id"]) for r in rejects if r["image_id"] is not None}
    if quarantined:
        is_known = pd.Series(list(zip(images["path"], images["image_id"])), index=images.index).isin(quarantined)
        images.loc[is_known & (images["status"] == "ok"), "status"] = "rejected"
    return images[IMAGE_COLUMNS].reset_index(drop=True), pd.DataFrame(rejects, columns=REJECT_COLUMNS)


class ImageCatalog:
    """``tables/images.parquet``, read once per task: which store rows hold which images.

    ``frame`` is the table as written (columns ``IMAGE_COLUMNS``); duplicates point to the row of
    their first copy and are skipped by every lookup below.
    """

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self._ok = frame[frame["status"] == "ok"]

    @classmethod
    def read(cls, run: RunDir) -> ImageCatalog:
        frame = run.read_table("images")
        if frame is None:
            raise RuntimeError(f"{run.uri} has no images table; run the extract stage first")
        return cls(frame)

    def rows(self, group: str, shard: int | None = None, with_rejected: bool = False) -> pd.DataFrame:
        """The distinct images of ``group`` (of one shard when given), in store-row order; with
        ``with_rejected`` also those a shard could not decode (they keep their rows, filled with 0)."""
        frame = self.frame[self.frame["status"].isin(["ok", "rejected"])] if with_rejected else self._ok
        part = frame[frame["group"] == group]
        if shard is not None:
            part = part[part["shard"] == shard]
        return part.sort_values("row")

    def shards(self, group: str) -> list[int]:
        """The shard numbers of ``group``, ascending (empty when the group has no images)."""
        return sorted(int(s) for s in self._ok.loc[self._ok["group"] == group, "shard"].unique())

    def row_of(self, image_ids, group: str = "guidance") -> np.ndarray:
        """Store rows (int64) of the given content ids within ``group``, in the order given."""
        part = self._ok[self._ok["group"] == group]
        lookup = pd.Series(part["row"].to_numpy(dtype=np.int64), index=part["image_id"].to_numpy())
        ids = list(image_ids)
        unknown = [i for i in ids if i not in lookup.index]
        if unknown:
            raise KeyError(f"{len(unknown)} image ids are not in the {group} rows of images.parquet "
                           f"(e.g. {unknown[0]}); the plan is older than the store: run the stage again")
        return lookup.loc[ids].to_numpy(dtype=np.int64)
