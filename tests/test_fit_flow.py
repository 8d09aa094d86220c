"""The fit flow: random sets, reproducible tables, Dask cluster, content-keyed cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from flows.extract import run_extract
from flows.fit import run_fit
from sacv.fit.fit_plan import plan_jobs
from sacv.io.zarr_store import store_identity_of
from tests.flow_helpers import make_config, write_collection


def with_pool(root: Path, n: int = 6, seed: int = 9) -> Path:
    """A separate random pool folder of generated random textures."""
    from sacv.demo import textures

    rng = np.random.default_rng(seed)
    pool = root / "pool"
    pool.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(textures.random_texture(48, rng)).save(pool / f"pool_{i}.png")
    return pool


def fit_config(root: Path, run: str, pool: Path | None = None, **fit):
    config = make_config(root, run=run)
    concepts = config.concepts.model_copy(
        update={"random_sets": 3, "images_per_set": 4, "random_pool": str(pool) if pool else None}
    )
    return config.model_copy(
        update={
            "layers": ["features.2"],
            "concepts": concepts,
            "dataset": None,
            "fit": config.fit.model_copy(update={"solver": "lbfgs", **fit}),
        }
    )


@pytest.fixture(scope="module")
def fitted_collection(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("fitcollection"), n_per_concept=6)


def test_random_sets_exclude_the_concept_and_follow_the_seed(fitted_collection, prefect):
    config = fit_config(fitted_collection, "plan")
    run_extract(config)
    images = pd.read_parquet(Path(config.run_dir) / "tables/images.parquet")
    own = images[images["role"] == "concept"].groupby("concept")["image_id"].apply(set)
    identity = store_identity_of(str(Path(config.run_dir) / "store.zarr"))
    jobs = plan_jobs(images, config, identity)
    concept_jobs = [j for j in jobs if j["kind"] == "concept"]
    pseudo_jobs = [j for j in jobs if j["kind"] == "pseudo"]
    assert len(concept_jobs) == 3 * 3 and len(pseudo_jobs) == 3 * 3 * 3  # no separate pool: a family per concept
    assert len(jobs) == len(concept_jobs) + len(pseudo_jobs)
    negatives = {(j["concept"], j["random_set"]): set(j["neg"]) for j in concept_jobs}
    for job in concept_jobs:
        assert not set(job["neg"]) & own[job["concept"]]
        assert set(job["pos"]) <= own[job["concept"]] and len(job["pos"]) == 4  # 4 of its 6 images
        assert len(job["neg"]) == 4
    assert len({tuple(j["neg"]) for j in concept_jobs if j["concept"] == "striped"}) > 1  # sets differ
    assert {j["concept"] for j in pseudo_jobs} == {f"pseudo_{p}:{k}" for p in range(3) for k in own.index}
    for job in pseudo_jobs:
        concept = job["concept"].split(":")[1]
        assert not set(job["pos"]) & set(job["neg"])  # shared images dropped from both sides
        assert not (set(job["pos"]) | set(job["neg"])) & own[concept]  # never the concept's own images
        assert set(job["neg"]) <= negatives[(concept, job["random_set"])]  # the concept's random set, less overlap
    again = plan_jobs(images, config, identity)
    wider = plan_jobs(
        images,
        config.model_copy(update={"layers": ["features.0", "features.2"]}),
        identity | {"layers": {**identity["layers"], "features.0": [32, 32, 8]}},
    )
    assert [j["key"] for j in wider if j["layer"] == "features.2"] == [j["key"] for j in jobs]  # no refit
    assert [j["key"] for j in again] == [j["key"] for j in jobs]
    reseeded = config.model_copy(update={"fit": config.fit.model_copy(update={"seed": 1})})
    assert [j["neg"] for j in plan_jobs(images, reseeded, identity)] != [j["neg"] for j in jobs]


def _table(config) -> pd.DataFrame:
    return pd.read_parquet(Path(config.run_dir) / "tables/vectors.parquet").drop(columns=["wall_s"])


def _vectors(config) -> np.ndarray:
    return zarr.open_group(str(Path(config.run_dir) / "store.zarr"), mode="r")["vectors/features.2/v"][...]


def test_seeded_runs_give_identical_tables_and_vectors(fitted_collection, prefect):
    first, second = fit_config(fitted_collection, "repro_a"), fit_config(fitted_collection, "repro_b")
    for config in (first, second):
        run_extract(config)
        summary = run_fit(config)
        assert summary.vectors == 9 + 27  # 3 concepts x 3 random sets + 3 families x 3 pseudo-concepts x 3 sets
    pd.testing.assert_frame_equal(_table(first), _table(second))
    np.testing.assert_array_equal(_vectors(first), _vectors(second))
    table = _table(first)
    assert list(table["vector_row"]) == list(range(36))
    assert set(table["kind"]) == {"concept", "pseudo"} and (table["norm"] > 0).all()
    v = _vectors(first)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_dask_cluster_gives_the_same_vectors_as_in_process(fitted_collection, prefect):
    from distributed import LocalCluster

    local = fit_config(fitted_collection, "fit_local")
    run_extract(local)
    run_fit(local)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = fit_config(fitted_collection, "fit_dask")
        remote = remote.model_copy(
            update={"execution": remote.execution.model_copy(update={"dask_address": cluster.scheduler_address})}
        )
        run_extract(remote)
        assert run_fit(remote).fitted == 36
    np.testing.assert_allclose(_vectors(local), _vectors(remote), atol=1e-5)
    a, b = _table(local), _table(remote)
    np.testing.assert_allclose(a["bal_acc"], b["bal_acc"], atol=1e-5)


def test_cache_refits_only_what_changed(tmp_path, prefect):
    root = write_collection(tmp_path, n_per_concept=5, n_per_class=1)
    pool = with_pool(root, n=12)
    config = fit_config(root, "cache", pool=pool)
    run_extract(config)
    first = run_fit(config)
    assert first.fitted == first.vectors == 3 * 3 + 3 * 3  # a separate pool: one family of 3 pseudo-concepts
    assert run_fit(config).fitted == 0
    before = _table(config).set_index(["concept", "random_set"])["key"]
    # one more dotted image: only dotted's 3 vectors have new inputs (its 4 positives are drawn from 6 now;
    # the shared pseudo-concepts come from the pool only)
    shutil.copy(next((root / "concepts" / "striped").glob("*.png")), root / "concepts" / "dotted" / "extra.png")
    run_extract(config)
    second = run_fit(config)
    assert second.fitted == 3
    after = _table(config).set_index(["concept", "random_set"])["key"]
    changed = after[after != before.reindex(after.index)]
    assert set(changed.index.get_level_values("concept")) == {"dotted"} and len(changed) == 3
