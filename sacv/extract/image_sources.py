"""Image collections -> candidate files: concept folders and the random pool (group ``guidance``),
and the audit images from class folders or a manifest (group ``dataset``), with their class
labels matched to the model's class names."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

import pandas as pd

from sacv.config import ConceptsConfig, DatasetConfig
from sacv.errors import InputError, MissingInput
from sacv.io import storage
from sacv.io.images import IMAGE_EXTENSIONS, list_files


@dataclass(frozen=True)
class Candidate:
    path: str
    group: str  # guidance | dataset
    role: str  # concept | random | dataset
    concept: str | None = None
    label: int | None = None
    mask: str | None = None


def subfolders(root: str) -> list[str]:
    fs, base = storage.url_to_fs(root)
    if not fs.isdir(base):
        raise MissingInput(f"folder {root} does not exist; check the path in the config")
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False) if fs.isdir(p))


def concept_candidates(cfg: ConceptsConfig) -> list[Candidate]:
    """One candidate per image of each concept folder, plus the random pool if it is separate."""
    folders = subfolders(cfg.root)
    names = cfg.names or folders
    missing = [n for n in names if n not in folders]
    if missing:
        close = {n: difflib.get_close_matches(n, folders, n=3) for n in missing}
        raise InputError(f"concept folders not found under {cfg.root}: {close} (name: close folder names)")
    if cfg.random_pool is None and len(folders) < 2:
        raise InputError("random sets need other concept folders or a `concepts.random_pool` folder")
    root = cfg.root.rstrip("/")
    out = [Candidate(p, "guidance", "concept", concept=f) for f in folders for p in list_files(f"{root}/{f}")]
    if cfg.random_pool is not None:
        out += [Candidate(p, "guidance", "random", concept="random") for p in list_files(cfg.random_pool)]
    empty = [n for n in names if not any(c.concept == n and c.path.lower().endswith(IMAGE_EXTENSIONS) for c in out)]
    if empty:
        raise InputError(f"concept folders with no images: {empty}; add images or remove them from concepts.names")
    return out


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


@functools.lru_cache(maxsize=8)
def _class_lookup(class_names: tuple[str, ...]) -> dict[str, int]:
    """Normalised class name -> index, built once per list of class names."""
    return {_normalise(n): i for i, n in enumerate(class_names)}


def match_class(folder: str, class_names: list[str]) -> int:
    """A class folder name -> class index: an index, or a class name (case, '_' and '-' ignored)."""
    if folder.isdigit() and int(folder) < len(class_names):
        return int(folder)
    lookup = _class_lookup(tuple(class_names))
    if _normalise(folder) in lookup:
        return lookup[_normalise(folder)]
    names = list(lookup)
    close = difflib.get_close_matches(_normalise(folder), names, n=5) or difflib.get_close_matches(
        _normalise(folder), names, n=5, cutoff=0.3
    )
    shown = f"close class names: {close}" if close else f"no class name is close; the first are {names[:5]}"
    raise InputError(
        f"class folder {folder!r} matches no class of the model; {shown}. "
        "Rename the folder to a class name or its index, or move it out of dataset.root."
    )


def dataset_candidates(cfg: DatasetConfig, class_names: list[str]) -> list[Candidate]:
    if (cfg.root is None) == (cfg.manifest is None):
        raise InputError("give exactly one of dataset.root (class folders) or dataset.manifest (CSV/Parquet)")
    if cfg.root is not None:
        root = cfg.root.rstrip("/")
        out = []
        for folder in subfolders(cfg.root):
            paths = list_files(f"{root}/{folder}")
            if paths:  # an empty folder needs no class
                label = match_class(folder, class_names)  # once per folder, not per file
                out += [Candidate(p, "dataset", "dataset", label=label) for p in paths]
        return out
    reader = pd.read_parquet if cfg.manifest.endswith(".parquet") else pd.read_csv
    table = reader(cfg.manifest, storage_options=storage.options_for(cfg.manifest) or None)
    if "path" not in table.columns:
        raise InputError(f"manifest {cfg.manifest} has no 'path' column (columns: {list(table.columns)})")
    base = cfg.manifest.rsplit("/", 1)[0] if "/" in cfg.manifest else "."

    def resolve(p):
        return None if pd.isna(p) else (p if "://" in p or p.startswith("/") else f"{base}/{p}")

    labels = table["label"] if "label" in table.columns else pd.Series([None] * len(table))
    masks = table["mask"] if "mask" in table.columns else pd.Series([None] * len(table))
    out, named = [], {}  # named: each distinct class name matched once
    for path, label, mask in zip(table["path"], labels, masks):
        if pd.isna(label):
            label = None
        elif not str(label).isdigit():
            if label not in named:
                named[label] = match_class(str(label), class_names)
            label = named[label]
        out.append(
            Candidate(
                resolve(path), "dataset", "dataset", label=None if label is None else int(label), mask=resolve(mask)
            )
        )
    return out
