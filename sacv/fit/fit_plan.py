"""The fitting stage: random sets, one vector per (layer, concept, random set), pseudo-concepts, cache.

- A concept's positives are a seeded draw of ``concepts.images_per_concept`` (n) of its images.
- Random sets ``random_0 … random_{R-1}`` of concept k are drawn with the seed from the random
  pool (the ``random`` role when ``concepts.random_pool`` is set, else every guidance image) minus
  the images of k (compared by content id), so they never contain the concept's own images; they
  are disjoint when the pool is large enough. With a separate pool, all concepts share the sets.
- Pseudo-concepts ``pseudo_0 … pseudo_{P-1}`` (``concepts.pseudo_concepts``) are sets of n images of
  the same pool, each fitted against the same R random sets as the concept: the reference that the
  contributions table tests a concept against (``sacv.stats.contributions``). They are disjoint
  from each other and from the random sets when the pool holds R·images_per_set + P·n images;
  otherwise drawn independently (images a pseudo-concept shares with a random set are dropped from
  both sides). With a separate pool all concepts share one family of pseudo-concepts (fitted once);
  without one, each concept has its own (named ``pseudo_<p>:<concept>``).
- Every job has a content key: store identity, layer, the image ids of both sides, the fit
  settings and the seed. Its result (``RunDir.write_fit_result``) is the cache: a rerun fits only
  jobs whose key has no result. The jobs to fit are cut into blocks (``sacv.fit.sweep.plan_blocks``),
  one task each, that share one read of the layer. ``collect_vectors`` then writes
  ``vectors/<layer>/…`` in the store and ``tables/vectors.parquet`` (one writer).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from sacv.config import RunConfig, numeric_mode, require_concept_images
from sacv.errors import InputError, NotYetRun
from sacv.extract.catalog import ImageCatalog
from sacv.fit.sweep import plan_blocks
from sacv.io.handoffs import FitPlan
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import store_identity_of
from sacv.stats.contributions import pseudo_name

VECTOR_COLUMNS = [
    "layer",
    "concept",
    "random_set",
    "kind",
    "vector_row",
    "seed",
    "solver",
    "n_pos",
    "n_neg",
    "n_val",
    "acc",
    "bal_acc",
    "auroc",
    "norm",
    "near_chance",
    "passes",
    "n_iter",
    "wall_s",
    "key",
    "cosine_to_logistic",
    "bal_acc_logistic",  # mean_difference with fit.compare_logistic, else null
]
MEAN_DIFFERENCE_ONLY = ("whiten", "intercept", "compare_logistic")
# Settings of retired solvers (sgd's epochs), hashed at their last default so that the keys of earlier
# fits, and with them the fits, stay valid.
RETIRED_FIT_SETTINGS = {"epochs": 5}


def draw_random_sets(pool: list[str], exclude: set[str], n_sets: int, per_set: int, seed: int) -> list[list[str]]:
    """``n_sets`` seeded sets of ``per_set`` image ids from ``pool`` minus ``exclude``: disjoint
    slices of one permutation when the pool is large enough, else independent draws."""
    candidates = sorted(set(pool) - exclude)
    if len(candidates) < 2:
        raise InputError(f"the random pool has {len(candidates)} usable images; add images or set concepts.random_pool")
    per_set = min(per_set, len(candidates))
    if len(candidates) >= n_sets * per_set:
        order = np.random.default_rng(seed).permutation(candidates)
        return [sorted(order[r * per_set : (r + 1) * per_set].tolist()) for r in range(n_sets)]
    draws = [np.random.default_rng([seed, r]).choice(candidates, size=per_set, replace=False) for r in range(n_sets)]
    return [sorted(d.tolist()) for d in draws]


def concept_positives(images: list[str], n: int, seed: int, concept: str) -> list[str]:
    """The ``n`` image ids a concept is fitted with: a seeded draw from its ``images`` (all of them
    when it has exactly ``n``). Fewer than ``n`` is an error naming the key and the minimum."""
    require_concept_images(concept, len(images), n)
    if len(images) == n:
        return sorted(images)
    tag = int(hashlib.sha256(concept.encode()).hexdigest()[:8], 16)
    return sorted(np.random.default_rng([seed, tag]).choice(sorted(images), size=n, replace=False).tolist())


def draw_pseudo_concepts(
    pool: list[str], exclude: set[str], negatives: list[list[str]], n_sets: int, size: int, seed: int
) -> list[list[str]]:
    """``n_sets`` pseudo-concepts of ``size`` image ids from ``pool`` minus ``exclude``, from the images
    in no random set of ``negatives`` (disjoint when there are enough of them, else independent
    draws). When fewer than ``size`` such images are left, each set takes all of them and is topped
    up with a seeded draw from the random sets' images (shared images are dropped from both sides
    of that fit; see the module docstring)."""
    candidates = sorted(set(pool) - exclude)
    if len(candidates) < size:
        raise InputError(
            f"the random pool has {len(candidates)} usable images for pseudo-concepts of {size} images "
            "(concepts.images_per_concept): add random images (concepts.random_pool) or lower it"
        )
    spare = sorted(set(candidates) - set().union(*map(set, negatives)))
    if len(spare) >= size:
        return draw_random_sets(spare, set(), n_sets, size, seed + 1)
    rest = sorted(set(candidates) - set(spare))
    return [sorted(spare + _spread_fill(rest, negatives, size - len(spare), [seed + 1, p])) for p in range(n_sets)]


def _spread_fill(images: list[str], negatives: list[list[str]], n: int, seed: list[int]) -> list[str]:
    """``n`` of ``images`` in a seeded order, taking as few as possible from any one random set of
    ``negatives`` (so that no fit of a topped-up pseudo-concept loses most of one side)."""
    order = np.random.default_rng(seed).permutation(images).tolist()
    member = {image: [r for r, neg in enumerate(negatives) if image in set(neg)] for image in order}
    taken: list[str] = []
    counts = np.zeros(len(negatives), dtype=int)
    limit = 1
    while len(taken) < n:
        for image in order:
            if len(taken) == n:
                break
            if image not in taken and all(counts[r] < limit for r in member[image]):
                taken.append(image)
                counts[member[image]] += 1
        limit += 1
    return taken


def plan_jobs(images: pd.DataFrame, config: RunConfig, identity: dict) -> list[dict]:
    """Every vector to fit, in a fixed order, each with its positive/negative image ids and key.
    ``images``: the current rows of the images table (``ImageCatalog.current``: no removed images)."""
    guidance = images[images["group"] == "guidance"]
    by_concept = guidance[guidance["role"] == "concept"].groupby("concept")["image_id"].apply(lambda s: sorted(set(s)))
    cfg = config.concepts
    names = cfg.names or sorted(by_concept.index)
    empty = [k for k in names if k not in by_concept.index]
    if empty:
        raise InputError(f"concepts {empty} have no usable images (all rejected?); see tables/rejects.parquet")
    random_role = guidance[guidance["role"] == "random"]
    shared = len(random_role) > 0  # a separate pool: every concept gets the same random sets and pseudo-concepts
    pool = (random_role if shared else guidance)["image_id"].tolist()
    seed, n = config.fit.seed, cfg.images_per_concept
    negatives = {
        k: draw_random_sets(pool, set(by_concept[k]), cfg.random_sets, cfg.images_per_set, seed) for k in names
    }
    pairs = []
    for k in names:
        positives = concept_positives(by_concept[k], n, seed, k)
        pairs += [(k, "concept", positives, f"random_{r}", neg) for r, neg in enumerate(negatives[k])]
    for k in names[:1] if shared else names:  # with a separate pool, the first concept's family is every concept's
        family = draw_pseudo_concepts(pool, set(by_concept[k]), negatives[k], cfg.pseudo_concepts, n, seed)
        for p, members in enumerate(family):
            name = pseudo_name(p, None if shared else k)
            for r, neg in enumerate(negatives[k]):
                pos, neg_only = sorted(set(members) - set(neg)), sorted(set(neg) - set(members))
                pairs.append((name, "pseudo", pos, f"random_{r}", neg_only))
    for concept, _, positives, random_set, negative_ids in pairs:
        if len(positives) < 2 or len(negative_ids) < 2:
            raise InputError(
                f"{concept} vs {random_set} would have {len(positives)} and {len(negative_ids)} images; each side "
                "needs at least 2: add random images (concepts.random_pool), or lower concepts.images_per_set "
                "or concepts.images_per_concept"
            )
    settings = config.fit.model_dump(mode="json") | RETIRED_FIT_SETTINGS
    if config.fit.solver != "mean_difference":  # keys that only mean_difference reads: not part of other keys
        settings = {k: v for k, v in settings.items() if k not in MEAN_DIFFERENCE_ONLY}
    jobs = []
    for layer in config.layers:
        # what this layer's activations depend on (not the other layers: adding one refits nothing here)
        layer_identity = {k: v for k, v in identity.items() if k != "layers"} | {"shape": identity["layers"][layer]}
        for concept, kind, positives, random_set, negatives in pairs:
            content = {"store": layer_identity, "layer": layer, "pos": positives, "neg": negatives, "fit": settings}
            if numeric_mode(config):  # activations extracted in another numeric mode: other vectors
                content["numerics"] = numeric_mode(config)
            key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
            jobs.append(
                {
                    "layer": layer,
                    "concept": concept,
                    "kind": kind,
                    "random_set": random_set,
                    "pos": positives,
                    "neg": negatives,
                    "key": key,
                }
            )
    return jobs


def plan_fits(run_uri: str, config: RunConfig) -> FitPlan:
    """Write the fit plan into the run directory; return the number of jobs and the keys without a cached result."""
    run = RunDir(run_uri)
    jobs = plan_jobs(ImageCatalog.read(run).current(), config, store_identity_of(run.store_uri, run.storage_options))
    run.write_fit_plan(jobs)
    todo = list(dict.fromkeys(job["key"] for job in jobs if not run.has_fit_result(job["layer"], job["key"])))
    shapes = store_identity_of(run.store_uri, run.storage_options)["layers"]
    blocks = plan_blocks(jobs, todo, shapes, config.fit.memory_budget_mb)
    return FitPlan(total=len(jobs), todo=todo, blocks=blocks)


def collect_vectors(run_uri: str) -> pd.DataFrame:
    """Write ``vectors/<layer>/{v,b,coef,intercept}`` (one row per planned job, plan order) and vectors.parquet."""
    run = RunDir(run_uri)
    jobs = run.read_fit_plan()
    root = run.open_zarr("a")
    rows = []
    for layer in dict.fromkeys(job["layer"] for job in jobs):
        layer_jobs = [job for job in jobs if job["layer"] == layer]
        results = [run.read_fit_result(layer, job["key"]) for job in layer_jobs]
        missing = sum(r is None for r in results)
        if missing:
            raise NotYetRun(f"{missing} fits of layer {layer!r} have no result yet; run the fit stage again")
        # identical content shares one cached result: labels come from the job, not the result
        results = [
            {**r, **{k: job[k] for k in ("concept", "random_set", "kind")}} for job, r in zip(layer_jobs, results)
        ]
        group = root.require_group(f"vectors/{layer}")
        arrays = {
            "v": np.array([r["vector"] for r in results], np.float32),  # (K_total, C) unit, towards the concept
            "b": np.array([r["offset"] for r in results], np.float32),  # (K_total,) offset of the unit vector
            "coef": np.array([r["coef"] for r in results], np.float32),  # (K_total, C) raw normal
            "intercept": np.array([r["intercept"] for r in results], np.float32),  # (K_total,)
        }
        for name, values in arrays.items():
            group.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True)[...] = values
        group.attrs["rows"] = [{k: r[k] for k in ("concept", "random_set", "kind")} for r in results]
        rows += [{**{k: r[k] for k in VECTOR_COLUMNS if k in r}, "vector_row": i} for i, r in enumerate(results)]
    table = pd.DataFrame(rows, columns=VECTOR_COLUMNS)
    run.write_table("vectors", table)
    return table
