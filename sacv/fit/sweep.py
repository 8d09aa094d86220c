"""Blocks of fit jobs that share one read of a layer's guidance activations.

- ``plan_blocks`` cuts a layer's jobs into blocks: jobs that share their positives (the R random
  sets of one concept or pseudo-concept) form a group, and groups are packed in plan order into blocks
  whose images, as float32 positions, and per-(image, job) tables fit ``fit.memory_budget_mb``. A
  group larger than the budget alone is a block of its own and is streamed (re-read chunk by chunk
  in every solver pass).
- ``fit_block`` reads the block's images once (``PositionReader``), fits its jobs with the
  configured solver and writes one result per job (``RunDir.write_fit_result``): the cache stays per
  vector. The batched solvers (``sacv.fit.solvers``) fit every job of the block in one solve
  (:func:`fit_jobs`): images are ordered so that those of the same jobs are together, and each block
  of positions computes only its own jobs. They take the per-image statistics from the store
  (``sacv.extract.position_stats``; computed from the positions only for shards written without them) and read
  only the images their solver needs.
"""

from __future__ import annotations

import time
import warnings

import dask.array as da
import numpy as np

from sacv.config import RunConfig
from sacv.extract.catalog import ImageCatalog
from sacv.extract.position_stats import MARKER_FLAG, read_stats
from sacv.fit import solvers
from sacv.fit.per_job import OutOfCoreConceptVector, positions_from_store
from sacv.fit.position_reader import BLOCK_IMAGES, PositionReader
from sacv.io.rundir import RunDir
from sacv.method.vectors import NearChanceWarning, grouped_validation_split, set_fitted_vector

TABLE_BYTES = 24  # per (image, job) of a block: the float64 weights and signs and the masks a batched solve holds
BATCHED = ("auto", "lbfgs")  # solvers run as one batched exact L-BFGS per block (each job its own L-BFGS)


def _group_of(job: dict) -> tuple:
    return job["layer"], tuple(job["pos"])


def _bytes(ids: set[str], n_jobs: int, shape: list[int]) -> int:
    h, w, c = shape
    return len(ids) * (h * w * c * 4 + n_jobs * TABLE_BYTES)  # float32 positions + per-job tables


def plan_blocks(
    jobs: list[dict], todo: list[str], shapes: dict[str, list[int]], memory_budget_mb: int
) -> list[tuple[str, list[str]]]:
    """``(layer, keys)`` per block: the todo jobs, grouped by shared positives, packed within the budget."""
    wanted = set(todo)
    groups: dict[tuple, list[dict]] = {}
    seen: set[str] = set()
    for job in jobs:
        if job["key"] in wanted and job["key"] not in seen:
            seen.add(job["key"])
            groups.setdefault(_group_of(job), []).append(job)
    budget = memory_budget_mb * 2**20
    blocks: list[tuple[str, list[str], set[str]]] = []
    for (layer, _), members in groups.items():
        ids = {i for job in members for i in job["pos"] + job["neg"]}
        last = blocks[-1] if blocks else None
        same_layer = last is not None and last[0] == layer
        if same_layer and _bytes(last[2] | ids, len(last[1]) + len(members), shapes[layer]) <= budget:
            last[1].extend(job["key"] for job in members)
            last[2].update(ids)
        else:
            blocks.append((layer, [job["key"] for job in members], ids))
    return [(layer, keys) for layer, keys, _ in blocks]


class _Fitted:
    """Holder of the attributes ``set_fitted_vector`` sets (coef_, vector_, metrics_, …)."""

    def __init__(self, near_chance: float):
        self.near_chance = near_chance


class JobSides:
    """Per image and job of a list of jobs: the images are the jobs' store ``rows`` (sorted), all
    (n_img, J) bool: ``pos`` concept side (an image on both sides counts as random, as the per-job
    labels always did), ``member`` in the job, ``val`` held out (whole images, drawn as
    ``grouped_validation_split`` draws them per job), ``train`` = member and not held out."""

    def __init__(self, jobs: list[dict], row_of: dict[str, int], validation_fraction: float, seed: int):
        self.jobs = jobs
        self.rows = np.array(sorted({row_of[i] for job in jobs for i in job["pos"] + job["neg"]}), np.int64)
        local_of = {int(r): k for k, r in enumerate(self.rows)}
        n_img = len(self.rows)
        pos, member = np.zeros((n_img, len(jobs)), bool), np.zeros((n_img, len(jobs)), bool)
        for j, job in enumerate(jobs):
            pos[[local_of[row_of[i]] for i in job["pos"]], j] = True
            neg = [local_of[row_of[i]] for i in job["neg"]]
            pos[neg, j] = False
            member[:, j] = pos[:, j]
            member[neg, j] = True
        val = np.zeros_like(member)
        for j in range(len(jobs)):
            m = np.flatnonzero(member[:, j])
            val[m, j] = grouped_validation_split(pos[m, j].astype(np.int8), self.rows[m], validation_fraction, seed)
        self.pos, self.member, self.val, self.train = pos, member, val, member & ~val


def reads_training_positions(fit) -> bool:
    """Whether the configured fit reads the training positions; if not (``mean_difference`` with
    the midpoint intercept, no whitening, no comparison) it reads only the held-out images."""
    return fit.solver != "mean_difference" or fit.whiten or fit.intercept == "logistic" or fit.compare_logistic


def _result(job: dict, fitted, config: RunConfig, solver: str, passes: int, n_iter: int, wall: float) -> dict:
    """The cached result of one job (docs/store.md, ``fits/<layer>/<key>.json``)."""
    return {
        **{k: job[k] for k in ("layer", "concept", "kind", "random_set", "key")},
        **fitted.metrics_,
        "seed": config.fit.seed,
        "solver": solver,
        "near_chance": bool(fitted.near_chance_),
        "passes": passes,
        "n_iter": n_iter,
        "wall_s": round(wall, 3),
        "vector": fitted.vector_.tolist(),
        "coef": fitted.coef_.tolist(),
        "intercept": fitted.intercept_,
        "offset": fitted.offset_,
    }


def fit_one(reader: PositionReader, job: dict, row_of: dict[str, int], config: RunConfig) -> dict:
    """One job on its own with :class:`OutOfCoreConceptVector` over the shared read (solver
    ``dask_ml``, and any solver with ``fit.max_positions_per_class``)."""
    started = time.perf_counter()
    fit = config.fit
    label_of = dict.fromkeys((row_of[i] for i in job["pos"]), 1) | dict.fromkeys((row_of[i] for i in job["neg"]), 0)
    local = np.flatnonzero(np.isin(reader.rows, list(label_of)))
    rows = reader.rows[local]
    if reader.data is not None:
        X = da.from_array(reader.data[local].reshape(-1, reader.channels), chunks=(BLOCK_IMAGES * reader.per_image, -1))
    else:
        X = positions_from_store(reader.array, rows)
    y = np.repeat([label_of[r] for r in rows], reader.per_image)
    solver = "lbfgs" if fit.solver in BATCHED else fit.solver
    estimator = OutOfCoreConceptVector(
        solver=solver,
        C=fit.C,
        standardize=fit.standardize,
        validation_fraction=fit.validation_fraction,
        max_positions_per_class=fit.max_positions_per_class,
        near_chance=fit.near_chance,
        max_iter=fit.max_iter,
        tol=fit.tol,
        random_state=fit.seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NearChanceWarning)  # recorded as near_chance and logged by the task
        estimator.fit(X, y, np.repeat(rows, reader.per_image))
    return _result(job, estimator, config, solver, estimator.passes_, estimator.n_iter_, time.perf_counter() - started)


def _job_order(member: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images in the (n_img,) mask ``images``, ordered so that images of the same jobs (equal
    rows of ``member`` (n_img, J)) are together, and a label per image for those runs."""
    chosen = np.flatnonzero(images)
    _, label = np.unique(member[chosen], axis=0, return_inverse=True)
    order = np.argsort(label.ravel(), kind="stable")
    return chosen[order], label.ravel()[order]


def fit_jobs(
    reader: PositionReader,
    sides: JobSides,
    stats: tuple[np.ndarray, np.ndarray, np.ndarray],
    config: RunConfig,
    computed: np.ndarray | None = None,
) -> list[dict]:
    """Fit the jobs of ``sides`` from their images' statistics ``stats`` = (sums (n_img, C) float64,
    sums of squares (n_img, C) float64, counts (n_img,) int64, in ``sides.rows`` order) and the
    positions ``reader`` holds; results per job. The reader must hold every image the fit reads: the
    held-out ones, and with :func:`reads_training_positions` all of the jobs'. ``computed`` (n_img,)
    bool: images whose statistics took a pass over their positions (not stored)."""
    started = time.perf_counter()

    def blocks(images: np.ndarray) -> solvers.Blocks:  # positions of the images in the (n_img,) mask, by job
        order, runs = _job_order(sides.member, images)
        return reader.blocks_of(sides.rows[order], order, runs)

    computed = np.zeros(len(sides.rows), bool) if computed is None else computed
    stats_computed = (sides.member & computed[:, None]).any(axis=0)  # (J,)
    if config.fit.solver in BATCHED:
        w, b, n_iter, passes = _logistic_vectors(blocks, sides, stats, config.fit)
        extra: list[dict] = [{} for _ in sides.jobs]
    else:
        w, b, passes, extra = _mean_difference_vectors(blocks, sides, stats, config.fit, reader.channels)
        n_iter = np.zeros(len(sides.jobs), np.int64)
    scores = solvers.select_scores(blocks(sides.val.any(axis=1)), w, b, sides.val)  # held-out images only
    passes = passes + 1 + stats_computed
    wall = (time.perf_counter() - started) / len(sides.jobs)
    results = _job_results(sides, stats[2], config, (w, b), scores, wall)
    for j, result in enumerate(results):
        result.update(passes=int(passes[j]), n_iter=int(n_iter[j]), **extra[j])
        result["image_stats"] = "computed" if stats_computed[j] else "stored"
    return results


def _side_positions(sides: JobSides, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training positions per job (J,) float64 on the concept side and on the random side."""
    concept, random = sides.train & sides.pos, sides.train & ~sides.pos  # (n_img, J)
    return concept.T.astype(np.float64) @ counts, random.T.astype(np.float64) @ counts


def _logistic_vectors(blocks, sides: JobSides, stats: tuple, fit) -> tuple[np.ndarray, ...]:
    """The exact balanced logistic vectors of every job (:func:`solvers.batched_logistic`, over the
    training images only: a held-out image has weight 0 in every job): normals (J, C), intercepts
    (J,), L-BFGS iterations (J,) and passes (J,)."""
    sums, squares, counts = stats
    train, pos = sides.train, sides.pos
    n_pos, n_neg = _side_positions(sides, counts)
    weight = np.where(train & pos, (n_pos + n_neg) / (2 * n_pos), np.where(train, (n_pos + n_neg) / (2 * n_neg), 0.0))
    mean, scale = solvers.job_moments(train, sums, squares, counts)
    sign = np.where(pos, 1.0, -1.0)
    jobs = solvers.LogisticJobs(weight, sign, mean, scale, counts)
    return solvers.batched_logistic(blocks(train.any(axis=1)), jobs, fit.C, fit.standardize, fit.max_iter, fit.tol)


def _mean_difference_vectors(blocks, sides: JobSides, stats: tuple, fit, channels: int):
    """FastCAV's vectors of every job (optionally whitened per group, with a 1-D logistic intercept,
    and compared with the exact vectors): normals (J, C), intercepts (J,), passes (J,) and per job the
    comparison columns (``cosine_to_logistic``, ``bal_acc_logistic``) or an empty dict."""
    sums, _, counts = stats
    jobs, pos, train, val = sides.jobs, sides.pos, sides.train, sides.val
    J = len(jobs)
    passes = np.zeros(J, np.int64)
    extra: list[dict] = [{} for _ in jobs]
    w, b = solvers.mean_difference(train & pos, train & ~pos, sums, counts)
    if fit.whiten:  # by the covariance of each group's positions (a concept or pseudo-concept and its random sets)
        groups: dict[tuple, list[int]] = {}
        for j, job in enumerate(jobs):
            groups.setdefault(_group_of(job), []).append(j)
        for cols in groups.values():
            precision = solvers.shared_precision(blocks(sides.member[:, cols].any(axis=1)), channels)
            w[cols], b[cols] = solvers.mean_difference(
                train[:, cols] & pos[:, cols], train[:, cols] & ~pos[:, cols], sums, counts, precision
            )
        passes += 1
    if fit.intercept == "logistic":
        unit = w / np.linalg.norm(w, axis=1, keepdims=True)
        projections = solvers.select_scores(blocks(train.any(axis=1)), unit, np.zeros(J), train)
        passes += 1
        for j, (proj, image) in enumerate(projections):
            slope, intercept = solvers.logistic_1d(proj, pos[image, j].astype(int), fit.C)
            w[j], b[j] = slope * unit[j], intercept
    if fit.compare_logistic:
        w_log, b_log, _, p = _logistic_vectors(blocks, sides, stats, fit)
        passes += p + 1
        scores_log = solvers.select_scores(blocks(val.any(axis=1)), w_log, b_log, val)
        for j, (scores, image) in enumerate(scores_log):
            reference = _Fitted(fit.near_chance)
            set_fitted_vector(reference, w_log[j], b_log[j], pos[image, j].astype(int), scores, 0, 0)
            extra[j] = {
                "cosine_to_logistic": float(w[j] @ w_log[j] / (np.linalg.norm(w[j]) * np.linalg.norm(w_log[j]))),
                "bal_acc_logistic": reference.metrics_["bal_acc"],
            }
    return w, b, passes, extra


def _job_results(sides: JobSides, counts: np.ndarray, config: RunConfig, vectors: tuple, scores: list, wall: float):
    """One result row per job from its vector ``(w[j], b[j])`` and its held-out ``scores[j]``;
    ``passes`` and ``n_iter`` are set by the caller."""
    w, b = vectors
    n_pos, n_neg = _side_positions(sides, counts)
    solver = "lbfgs" if config.fit.solver in BATCHED else config.fit.solver
    results = []
    for j, job in enumerate(sides.jobs):
        fitted = _Fitted(config.fit.near_chance)
        val_scores, image = scores[j]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NearChanceWarning)  # recorded as near_chance and logged by the task
            set_fitted_vector(
                fitted, w[j], b[j], sides.pos[image, j].astype(int), val_scores, int(n_pos[j]), int(n_neg[j])
            )
        results.append(_result(job, fitted, config, solver, 0, 0, wall))
    return results


def fit_block(run_uri: str, config: RunConfig, layer: str, keys: list[str]) -> list[dict]:
    """Fit the planned jobs ``keys`` of ``layer`` from one read; write and return one result per job.

    Batched solvers (``mean_difference``; ``auto``/``lbfgs`` without ``max_positions_per_class``) fit
    every job of the block at once (:func:`fit_jobs`; results written when the solve ends), take
    their per-image statistics from the store (``sacv.extract.position_stats``), computing in one pass only those
    of images whose shard has none (a store written before they existed), and read only the images
    their solver needs (:func:`reads_training_positions`; else the held-out ones). Per-job solvers
    read every image of the block and write each result as it is fitted.
    """
    run = RunDir(run_uri)
    fit = config.fit
    plan = {job["key"]: job for job in run.read_fit_plan() if job["layer"] == layer}
    missing = [k for k in keys if k not in plan]
    if missing:
        raise KeyError(f"fit jobs {missing[:3]} of layer {layer!r} are not in fits/plan.json; plan the fits again")
    jobs = [plan[k] for k in dict.fromkeys(keys)]
    ids = sorted({i for job in jobs for i in job["pos"] + job["neg"]})
    row_of = dict(zip(ids, ImageCatalog.shared(run, "guidance").row_of(ids, "guidance").tolist()))
    rows = np.array(sorted(set(row_of.values())), np.int64)
    root = run.open_zarr("r")
    array = root[f"guidance/{layer}/act"]
    _, h, w, c = array.shape
    batched = fit.solver == "mean_difference" or (fit.solver in BATCHED and not fit.max_positions_per_class)
    if batched:
        sides = JobSides(jobs, row_of, fit.validation_fraction, fit.seed)  # every job of the block in one solve
        sums, squares, counts, have = read_stats(
            root, layer, rows, lambda shard: bool((run.read_shard_marker("guidance", shard) or {}).get(MARKER_FLAG))
        )
        if reads_training_positions(fit):
            needed = rows
        else:
            needed = np.union1d(sides.rows[sides.val.any(axis=1)], rows[~have])
    else:
        needed = rows
    reader = PositionReader(array, needed, resident=len(needed) * h * w * c * 4 <= fit.memory_budget_mb * 2**20)
    if batched:
        with (
            solvers.single_threaded_blas()
        ):  # threaded BLAS on a busy machine: a covariance pass took 2.0 s, not 0.05 s
            if not have.all():  # no stored statistics for these images: one pass over them
                lacking = np.flatnonzero(~have)
                computed = solvers.image_stats(
                    reader.blocks_of(rows[lacking], np.arange(len(lacking))), len(lacking), c
                )
                sums[lacking], squares[lacking], counts[lacking] = computed
            results = fit_jobs(reader, sides, (sums, squares, counts), config, ~have)  # sides.rows == rows
        for result in results:
            run.write_fit_result(layer, result["key"], result)
        return results
    results = []
    for job in jobs:  # per-job solvers: each result is kept as soon as it is fitted
        result = fit_one(reader, job, row_of, config)
        run.write_fit_result(layer, result["key"], result)
        results.append(result)
    return results
