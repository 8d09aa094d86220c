"""The fitting stage: random sets, one vector per (layer, concept, random set), null vectors, cache.

- Random sets ``random_0 … random_{R-1}`` of concept k are drawn with the seed from the random
  pool (the ``random`` role when ``concepts.random_pool`` is set, else every guidance image) minus
  the images of k (compared by content id), so they never contain the concept's own images; they
  are disjoint when the pool is large enough. With a separate pool, all concepts share the sets.
- Null vectors fit ``random_i`` against ``random_{i+1 mod R}`` drawn from the whole pool (each
  pair once; images in both sets are dropped from both).
- Every job has a content key: store identity, layer, the image ids of both sides, the fit
  settings and the seed. Its result (``RunDir.write_fit_result``) is the cache: a rerun fits only
  jobs whose key has no result. The jobs to fit are cut into blocks (``sacv.fit.sweep.plan_blocks``), one
  task each, that share one read of the layer. ``collect_vectors`` then writes ``vectors/<layer>/…`` in the store and
  ``tables/vectors.parquet`` (one writer).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from sacv.config import RunConfig, numeric_mode
from sacv.extract.catalog import ImageCatalog
from sacv.fit.sweep import plan_blocks
from sacv.io.handoffs import FitPlan
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import store_identity_of

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


def draw_random_sets(pool: list[str], exclude: set[str], n_sets: int, per_set: int, seed: int) -> list[list[str]]:
    """``n_sets`` seeded sets of ``per_set`` image ids from ``pool`` minus ``exclude``: disjoint
    slices of one permutation when the pool is large enough, else independent draws."""
    candidates = sorted(set(pool) - exclude)
    if len(candidates) < 2:
        raise ValueError(f"the random pool has {len(candidates)} usable images; add images or set concepts.random_pool")
    per_set = min(per_set, len(candidates))
    if len(candidates) >= n_sets * per_set:
        order = np.random.default_rng(seed).permutation(candidates)
        return [sorted(order[r * per_set : (r + 1) * per_set].tolist()) for r in range(n_sets)]
    draws = [np.random.default_rng([seed, r]).choice(candidates, size=per_set, replace=False) for r in range(n_sets)]
    return [sorted(d.tolist()) for d in draws]


def plan_jobs(images: pd.DataFrame, config: RunConfig, identity: dict) -> list[dict]:
    """Every vector to fit, in a fixed order, each with its positive/negative image ids and key.
    ``images``: the current rows of the images table (``ImageCatalog.current``: no removed images)."""
    guidance = images[images["group"] == "guidance"]
    by_concept = guidance[guidance["role"] == "concept"].groupby("concept")["image_id"].apply(lambda s: sorted(set(s)))
    cfg = config.concepts
    names = cfg.names or sorted(by_concept.index)
    empty = [k for k in names if k not in by_concept.index]
    if empty:
        raise ValueError(f"concepts {empty} have no usable images (all rejected?); see tables/rejects.parquet")
    random_role = guidance[guidance["role"] == "random"]
    pool = (random_role if len(random_role) else guidance)["image_id"].tolist()
    n_sets, per_set, seed = cfg.random_sets, cfg.images_per_set, config.fit.seed
    null_sets = draw_random_sets(pool, set(), n_sets, per_set, seed)
    pairs = []
    for k in names:
        for r, negatives in enumerate(draw_random_sets(pool, set(by_concept[k]), n_sets, per_set, seed)):
            pairs.append((k, "concept", by_concept[k], f"random_{r}", negatives))
    null_pairs = sorted({tuple(sorted((i, (i + 1) % n_sets))) for i in range(n_sets)}) if n_sets > 1 else []
    for i, j in null_pairs:
        a, b = set(null_sets[i]), set(null_sets[j])
        pairs.append((f"random_{i}", "null", sorted(a - b), f"random_{j}", sorted(b - a)))
    for concept, _, positives, random_set, negatives in pairs:
        if len(positives) < 2 or len(negatives) < 2:
            raise ValueError(
                f"{concept} vs {random_set} would have {len(positives)} and {len(negatives)} images; each side "
                "needs at least 2 (add images, raise concepts.images_per_set or set concepts.random_pool)"
            )
    settings = config.fit.model_dump(mode="json")
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
            raise RuntimeError(f"{missing} fits of layer {layer!r} have no result yet; run the fit stage again")
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
