"""Pseudo-concepts: how the fit plan draws them, and their vectors at chance on planted i.i.d. images.

The plan (``plan_jobs`` on planted image tables, no store): with a pool large enough, pseudo-concepts
are disjoint from each other and from the random sets, and never hold concept images; with a
separate random pool every concept shares one family (fitted once: the same keys whatever concepts
are configured); without one, each concept has its own family that avoids its images; an image a
pseudo-concept shares with a random set (pool too small) leaves both sides of that fit.

The vectors: every image is a random image-level offset plus position noise, all drawn alike, so a
pseudo-concept against a random set has nothing to learn (offsets twice the noise: one value then
spreads as on real layers, sd about 0.19). The jobs come from ``plan_jobs`` (random sets and
pseudo-concepts drawn as the fit stage draws them), the split and the fit from ``JobSides`` and
``fit_jobs``. A classifier fitted without the held-out images, scored on held-out images of both
sides drawn alike, has expected balanced accuracy 0.5 exactly; one job's value is spread widely (2
held-out images per side of 10), so the check averages many seeds. No model, no Prefect, no run
directory.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from sacv.config import parse_config
from sacv.extract.catalog import IMAGE_COLUMNS
from sacv.fit import solvers, sweep
from sacv.fit.fit_plan import plan_jobs
from sacv.io.zarr_store import store_identity

pytestmark = pytest.mark.filterwarnings("ignore::sacv.method.vectors.NearChanceWarning")  # pseudo-concepts: chance

HW, C, N_CONCEPT, POOL, SETS, PER_SET, PSEUDO = 4, 8, 10, 60, 3, 10, 3  # pool = 3 sets of 10 + 3 pseudo of 10
SEEDS = 80  # the mean of 720 pseudo-concept vectors varies by about 0.005 from one block of 80 seeds to the next


def planted_images(concepts: dict[str, int], pool: int) -> pd.DataFrame:
    """The current rows of an images table: ``concepts[k]`` guidance images of concept k, then
    ``pool`` images of the random role (none: no separate pool). Image ids tell what they are."""
    members = [(f"{k}_{i:03d}", "concept", k) for k, n in concepts.items() for i in range(n)]
    members += [(f"rand_{i:03d}", "random", "random") for i in range(pool)]
    rows = [
        {
            "image_id": image_id,
            "path": f"/x/{image_id}.png",
            "group": "guidance",
            "role": role,
            "concept": concept,
            "label": pd.NA,
            "mask": None,
            "row": i,
            "shard": i // 8,
            "status": "ok",
        }
        for i, (image_id, role, concept) in enumerate(members)
    ]
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS).astype({"label": "Int64", "row": "Int64", "shard": "Int64"})


def planned(tmp_path, images: pd.DataFrame, layers=("block",), fit: dict | None = None, **concepts) -> list[dict]:
    """``plan_jobs`` for ``images`` with the ``concepts`` settings (a separate pool when the table has one)."""
    (tmp_path / "concepts").mkdir(exist_ok=True)
    pool = (images["role"] == "random").any()
    config = parse_config(
        {
            "run_dir": str(tmp_path / "run"),
            "layers": list(layers),
            "concepts": {
                "root": str(tmp_path / "concepts"),
                "random_pool": str(tmp_path / "concepts") if pool else None,
                **concepts,
            },
            "fit": {"compare_logistic": False, **(fit or {})},
        }
    )
    shapes = {layer: [HW, HW, C] for layer in layers}
    return plan_jobs(images, config, store_identity("planted", "0" * 64, {"crop": 32}, shapes, "float16"))


def random_sets(jobs: list[dict], concept: str) -> dict[str, set[str]]:
    """random_set name -> the image ids of that random set of ``concept`` (its concept jobs' negatives)."""
    return {j["random_set"]: set(j["neg"]) for j in jobs if j["kind"] == "concept" and j["concept"] == concept}


def pseudo_sets(jobs: list[dict], randoms: dict[str, set[str]]) -> dict[str, set[str]]:
    """pseudo-concept name -> its image set, rebuilt from each of its jobs as the job's positives plus
    the images of the random set that the job dropped; the same set from every job (checked)."""
    sets: dict[str, set[str]] = {}
    for job in jobs:
        if job["kind"] != "pseudo":
            continue
        random_set = randoms[job["random_set"]]
        assert not set(job["pos"]) & set(job["neg"]) and set(job["neg"]) <= random_set
        members = set(job["pos"]) | (random_set - set(job["neg"]))
        assert sets.setdefault(job["concept"], members) == members, job["concept"]
    return sets


def test_a_separate_pool_gives_one_family_disjoint_from_the_random_sets_and_fitted_once(tmp_path):
    """3 concepts, a pool of exactly 3 random sets of 5 + 4 pseudo-concepts of 4 = 31 images."""
    concepts = {"striped": 6, "dotted": 7, "chequered": 5}
    images = planted_images(concepts, pool=31)
    settings = {"random_sets": 3, "images_per_set": 5, "images_per_concept": 4, "pseudo_concepts": 4}
    jobs = planned(tmp_path, images, layers=("a", "b"), **settings)
    for layer in ("a", "b"):
        here = [j for j in jobs if j["layer"] == layer]
        assert [j["kind"] for j in here] == ["concept"] * 3 * 3 + ["pseudo"] * 4 * 3  # K·R, then P·R once
    jobs = [j for j in jobs if j["layer"] == "a"]
    randoms = random_sets(jobs, "striped")
    assert all(random_sets(jobs, k) == randoms for k in concepts)  # every concept: the same random sets
    for job in jobs:
        if job["kind"] == "concept":  # a seeded draw of 4 of the concept's images
            assert len(job["pos"]) == 4 and all(i.startswith(f"{job['concept']}_") for i in job["pos"])
    family = pseudo_sets(jobs, randoms)
    assert sorted(family) == [f"pseudo_{p}" for p in range(4)]  # shared: no ":<concept>"
    pool = set(images.loc[images["role"] == "random", "image_id"])
    everything = [*family.values(), *randoms.values()]
    assert all(len(s) == 4 for s in family.values()) and all(len(s) == 5 for s in randoms.values())
    assert set().union(*everything) == pool and sum(map(len, everything)) == len(pool)  # disjoint, pool used up
    for job in jobs:
        if job["kind"] == "pseudo":  # nothing shared, so nothing dropped
            assert len(job["pos"]) == 4 and set(job["neg"]) == randoms[job["random_set"]]

    # fitted once: the same keys whatever concepts are configured, so the cache fits them once
    keys = [j["key"] for j in jobs if j["kind"] == "pseudo"]
    assert len(set(keys)) == len(keys) == 12
    for names in (["dotted"], ["chequered", "striped"]):
        again = planned(tmp_path, images, layers=("a",), names=names, **settings)
        assert [j["key"] for j in again if j["kind"] == "pseudo"] == keys, names
    reseeded = planned(tmp_path, images, layers=("a",), fit={"seed": 1}, **settings)
    assert not set(keys) & {j["key"] for j in reseeded}  # the seed draws other sets

    with pytest.raises(ValueError, match=r"'chequered' has 5 usable images.*concepts.images_per_concept is 6"):
        planned(tmp_path, images, **(settings | {"images_per_concept": 6}))


def test_without_a_pool_each_concept_has_its_own_family_that_avoids_its_images(tmp_path):
    """No random role: the pool is every guidance image; concept k's sets come from the others (60)."""
    concepts = {"striped": 30, "dotted": 30, "chequered": 30}
    images = planted_images(concepts, pool=0)
    jobs = planned(tmp_path, images, random_sets=3, images_per_set=8, images_per_concept=6, pseudo_concepts=5)
    assert len(jobs) == 3 * 3 + 3 * 5 * 3
    names = {j["concept"] for j in jobs if j["kind"] == "pseudo"}
    assert names == {f"pseudo_{p}:{k}" for p in range(5) for k in concepts}
    for k in concepts:
        randoms = random_sets(jobs, k)
        family = pseudo_sets([j for j in jobs if j["concept"].endswith(f":{k}")], randoms)
        assert len(family) == 5
        everything = [*family.values(), *randoms.values()]
        union = set().union(*everything)
        assert sum(map(len, everything)) == len(union) == 5 * 6 + 3 * 8  # disjoint: 54 of the 60 candidates
        assert not any(i.startswith(f"{k}_") for i in union)  # never the concept's own images
    assert len({j["key"] for j in jobs}) == len(jobs)  # three families, three sets of fits


def test_a_small_pool_drops_the_images_a_pseudo_concept_shares_with_a_random_set(tmp_path):
    """A pool of 24 that 3 random sets of 8 use up, pseudo-concepts of 6: every pseudo-concept shares
    its images with the random sets; the shared images leave both sides of that fit."""
    images = planted_images({"striped": 6}, pool=24)
    jobs = planned(tmp_path, images, random_sets=3, images_per_set=8, images_per_concept=6, pseudo_concepts=3)
    randoms = random_sets(jobs, "striped")
    assert set().union(*randoms.values()) == set(images.loc[images["role"] == "random", "image_id"])
    family = pseudo_sets(jobs, randoms)  # each job: positives + dropped images = the same set
    assert len(family) == 3 and all(len(s) == 6 for s in family.values())
    assert all(s <= set(images.loc[images["role"] == "random", "image_id"]) for s in family.values())
    dropped = [len(randoms[j["random_set"]]) - len(j["neg"]) for j in jobs if j["kind"] == "pseudo"]
    assert sum(dropped) > 0  # the case under test happened
    for job in jobs:
        if job["kind"] == "pseudo":
            overlap = family[job["concept"]] & randoms[job["random_set"]]
            assert set(job["pos"]) == family[job["concept"]] - overlap
            assert set(job["neg"]) == randoms[job["random_set"]] - overlap
            assert len(job["pos"]) >= 2 and len(job["neg"]) >= 2


def planted_fit(tmp_path, seed: int, solver: str, shift: float = 12.0) -> tuple[list[dict], list[dict], np.ndarray]:
    """(concept results, pseudo-concept results, u): ``N_CONCEPT`` concept images at +shift·u, a pool
    of ``POOL`` random images, ``SETS`` random sets of ``PER_SET`` and ``PSEUDO`` pseudo-concepts of
    ``N_CONCEPT`` (all disjoint); image offsets (sd 2) plus position noise (sd 1), float16 as in the
    store; ``fit.seed`` = ``seed`` draws the sets and the split."""
    rng = np.random.default_rng([7, seed])
    images = planted_images({"striped": N_CONCEPT}, POOL)
    ids, n = images["image_id"].tolist(), len(images)
    concept = (images["role"] == "concept").to_numpy()
    settings = {"random_sets": SETS, "images_per_set": PER_SET, "images_per_concept": N_CONCEPT}
    jobs = planned(tmp_path, images, fit={"solver": solver, "seed": seed}, pseudo_concepts=PSEUDO, **settings)
    config = parse_config(
        {
            "run_dir": str(tmp_path / "run"),
            "layers": ["block"],
            "fit": {"solver": solver, "seed": seed, "compare_logistic": False},
        }
    )
    u = rng.normal(size=C)
    u /= np.linalg.norm(u)
    values = rng.normal(0, 2.0, (n, 1, 1, C)) + rng.normal(0, 1.0, (n, HW, HW, C))
    values[concept] += shift * u
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=values.shape, chunks=(16, HW, HW, C), dtype="float16")
    array[...] = values.astype(np.float16)
    row_of = dict(zip(ids, range(n)))
    results = {}
    for kind in ("concept", "pseudo"):
        sides = sweep.JobSides([j for j in jobs if j["kind"] == kind], row_of, config.fit.validation_fraction, seed)
        reader = sweep.PositionReader(array, sides.rows, resident=True)
        stats = solvers.image_stats(reader.blocks_of(sides.rows, np.arange(len(sides.rows))), len(sides.rows), C)
        results[kind] = sweep.fit_jobs(reader, sides, stats, config)
    return results["concept"], results["pseudo"], u


def pseudo_accuracies(tmp_path, solver: str, seeds: int = SEEDS) -> np.ndarray:
    """(seeds, PSEUDO·SETS) held-out balanced accuracies of the pseudo-concept vectors; the concept
    vectors checked on the way."""
    accuracies, concept_accuracies = [], []
    for seed in range(seeds):
        concept, pseudo, u = planted_fit(tmp_path, seed, solver)
        assert len(pseudo) == PSEUDO * SETS and all(r["kind"] == "pseudo" for r in pseudo)
        assert all(r["n_pos"] == concept[0]["n_pos"] for r in pseudo)  # the concept's size: nothing dropped
        for r in concept:  # the planted concept on the right side, every job (cosine to u: lowest seen 0.59)
            assert np.dot(r["vector"], u) > 0.3, (seed, r["random_set"])
        concept_accuracies += [r["bal_acc"] for r in concept]
        accuracies.append([r["bal_acc"] for r in pseudo])
    assert np.mean(concept_accuracies) > 0.9  # measured: 0.99
    return np.array(accuracies)


@pytest.mark.parametrize("solver", ["mean_difference", "lbfgs"])
def test_pseudo_concept_vectors_are_at_chance_on_held_out_images(tmp_path, solver):
    accuracies = pseudo_accuracies(tmp_path, solver)
    assert 0.45 <= accuracies.mean() <= 0.55  # blocks of 80 seeds: 0.49-0.50 (both solvers); one vector: sd 0.20


def test_the_check_sees_held_out_images_leaking_into_training(tmp_path, monkeypatch):
    """Power of the check above: with the held-out images also in training, the same pseudo-concepts
    score well above chance."""
    original = sweep.JobSides.__init__

    def leaking(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.train = self.member.copy()

    monkeypatch.setattr(sweep.JobSides, "__init__", leaking)
    assert pseudo_accuracies(tmp_path, "mean_difference", seeds=20).mean() > 0.6  # measured: 0.72
