"""``sacv validate``: what a run checks before its first shard, done without extracting.

Every problem is one line naming what to fix: the config's keys, the model and its layers, the
concept folders and their sizes, the dataset's class folders (each stray folder on its own line,
with the closest class names), the names the policy checks use, and the run directory's place.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from sacv.audit.policy import validate_checks
from sacv.config import ConfigError, RunConfig, load_config, require_concept_images
from sacv.extract.image_sources import concept_candidates, dataset_candidates, match_class, subfolders
from sacv.io import storage
from sacv.io.images import list_files
from sacv.method.models import cached_model, resolve_layers


def config_problems(path: str | Path) -> tuple[RunConfig | None, list[str]]:
    """The config of ``path`` and, when it cannot be used, one line per problem."""
    try:
        return load_config(path), []
    except ConfigError as err:
        lines = str(err).splitlines()
        return None, [line.strip() for line in lines[1:]] if len(lines) > 1 else lines


def run_problems(config: RunConfig) -> list[str]:
    """One line per problem a run of ``config`` would meet before its first shard (empty: none)."""
    storage.use(config.storage_options)
    try:
        model = cached_model(
            config.model.spec, config.model.weights, config.execution.device, **config.model.loader_options()
        )
    except (ValueError, FileNotFoundError, ImportError) as err:
        return [f"model: {err}"]  # nothing below can be checked without it
    problems = []
    try:
        resolve_layers(model.module, config.layers)
    except ValueError as err:
        problems.append(f"layers: {err}")
    concepts: list[str] = []
    if config.concepts is not None:
        try:
            candidates = concept_candidates(config.concepts)
            counts = Counter(c.concept for c in candidates if c.role == "concept")
            concepts = sorted(counts)
            for concept, count in sorted(counts.items()):
                try:
                    require_concept_images(concept, count, config.concepts.images_per_concept)
                except ValueError as err:
                    problems.append(f"concepts: {err}")
        except (ValueError, FileNotFoundError) as err:
            problems.append(f"concepts: {err}")
    if config.dataset is not None:
        problems += [f"dataset: {problem}" for problem in _dataset_problems(config, model.class_names)]
    if config.checks:
        try:
            validate_checks(config, concepts, model.class_names)
        except ValueError as err:
            problems.append(f"checks: {err}")
    problem = _run_dir_problem(config.run_dir)
    return problems + ([f"run_dir: {problem}"] if problem else [])


def _dataset_problems(config: RunConfig, class_names: list[str]) -> list[str]:
    """Every class folder that matches no class (a manifest: its first problem)."""
    if config.dataset.root is None:
        try:
            dataset_candidates(config.dataset, class_names)
        except (ValueError, FileNotFoundError) as err:
            return [str(err)]
        return []
    root = config.dataset.root.rstrip("/")
    problems = []
    for folder in subfolders(root):
        if list_files(f"{root}/{folder}"):
            try:
                match_class(folder, class_names)
            except ValueError as err:
                problems.append(str(err))
    return problems


def _run_dir_problem(run_dir: str) -> str | None:
    """Why the run directory cannot be made or written (local: its nearest existing folder)."""
    if "://" in run_dir:
        try:
            fs, path = storage.url_to_fs(run_dir)
            fs.exists(path)
        except Exception as err:  # noqa: BLE001 - any failure to reach the store is the problem to show
            return f"{run_dir} cannot be reached ({type(err).__name__}: {err}); check the URL and storage_options"
        return None
    place = Path(run_dir).absolute()
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        return f"{place} is a file, so {run_dir} cannot be created; choose another run_dir"
    if not os.access(place, os.W_OK):
        return f"{place} is not writable, so {run_dir} cannot be written; choose another run_dir"
    return None
