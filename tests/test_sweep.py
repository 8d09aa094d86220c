"""Blocks of fit jobs: one read per block, the batched exact solver against the per-job solver,
mean difference against logistic on planted directions, the per-vector cache. No model, no Prefect."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from sacv.extract.catalog import ImageCatalog
from sacv.fit import sweep
from sacv.fit.fit_plan import collect_vectors, plan_fits
from sacv.fit.per_job import OutOfCoreConceptVector, positions_from_store
from sacv.fit.sweep import fit_block, plan_blocks
from sacv.method.vectors import grouped_validation_split
from tests.test_fit_job import LAYER, C, planted_run

pytestmark = pytest.mark.filterwarnings("ignore::sacv.method.vectors.NearChanceWarning")  # pseudo-concepts: chance


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def fit_all(run, config):
    plan = plan_fits(run.uri, config)
    for layer, keys in plan.blocks:
        fit_block(run.uri, config, layer, keys)
    return plan, collect_vectors(run.uri)


def checked_jobs(run, table):
    """(job, vector row) of the concept's R jobs and of one pseudo-concept's R jobs (the other
    pseudo-concepts run the same code on other image sets): the jobs compared job by job."""
    pairs = zip(run.read_fit_plan(), table.itertuples())
    pairs = [(job, row) for job, row in pairs if job["concept"] in ("striped", "pseudo_0")]
    assert [job["kind"] for job, _ in pairs] == ["concept"] * 3 + ["pseudo"] * 3
    assert all(job["concept"] == row.concept and job["random_set"] == row.random_set for job, row in pairs)
    return pairs


def sklearn_logistic(X, y, C: float, standardize: bool) -> np.ndarray:
    """The raw-space normal of scikit-learn's balanced L2 logistic regression, solved to tol 1e-10: a
    pseudo-concept's loss is flat (random against random images), and the default tol (1e-4) leaves
    its direction off by up to 1e-3 in cosine."""
    from sklearn.linear_model import LogisticRegression

    mean = X.mean(axis=0) if standardize else np.zeros(X.shape[1])
    scale = X.std(axis=0) if standardize else np.ones(X.shape[1])
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, tol=1e-10).fit((X - mean) / scale, y)
    return model.coef_[0] / scale


def job_positions(run, job):
    """The job's positions as the per-job fit stage read them: (X dask (n, C), y, groups)."""
    catalog = ImageCatalog.read(run)
    label_of = dict.fromkeys(catalog.row_of(job["pos"]).tolist(), 1) | dict.fromkeys(
        catalog.row_of(job["neg"]).tolist(), 0
    )
    rows = np.array(sorted(label_of))
    X = positions_from_store(zarr.open_group(run.store_uri, mode="r")[f"guidance/{job['layer']}/act"], rows)
    per = X.shape[0] // len(rows)
    return X, np.repeat([label_of[r] for r in rows], per), np.repeat(rows, per)


@pytest.mark.parametrize("standardize", [False, True])
def test_batched_solver_agrees_with_the_per_job_solvers(tmp_path, standardize):
    rng = np.random.default_rng(5)
    mixing = np.diag(np.exp(rng.normal(0, 0.7, C))) + 0.3 * rng.normal(size=(C, C))
    run, config, _ = planted_run(tmp_path, shift=0.8, mixing=mixing, fit={"C": 0.5, "standardize": standardize})
    plan, table = fit_all(run, config)
    coef = zarr.open_group(run.store_uri, mode="r")[f"vectors/{LAYER}/coef"][...]
    for job, row in checked_jobs(run, table):
        X, y, groups = job_positions(run, job)
        per_job = OutOfCoreConceptVector(solver="lbfgs", C=0.5, standardize=standardize, random_state=0).fit(
            X, y, groups
        )
        assert cosine(coef[row.vector_row], per_job.coef_) >= 0.9999
        assert row.bal_acc == pytest.approx(per_job.metrics_["bal_acc"], abs=0.01)
        assert (row.n_pos, row.n_neg) == (per_job.metrics_["n_pos"], per_job.metrics_["n_neg"])
        is_val = grouped_validation_split(y, groups, 0.25, 0)
        w = sklearn_logistic(X[~is_val].compute().astype(np.float64), y[~is_val], 0.5, standardize)
        assert cosine(coef[row.vector_row], w) >= 0.99999  # scikit-learn, in memory (measured: 1 - 1e-7)


def record_readers(monkeypatch) -> list:
    """Every ``sweep.PositionReader`` the fit creates from now on, in order."""
    readers = []
    original = sweep.PositionReader.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        readers.append(self)

    monkeypatch.setattr(sweep.PositionReader, "__init__", recording)
    return readers


def test_a_block_reads_each_chunk_once_and_the_cache_stays_per_vector(tmp_path, monkeypatch):
    run, config, _ = planted_run(tmp_path)
    readers = record_readers(monkeypatch)
    plan, _ = fit_all(run, config)
    assert plan.blocks == [(LAYER, plan.todo)] and len(plan.todo) == 3 + 3 * 3  # 3 concept + 3x3 pseudo, one task
    (reader,) = readers
    assert reader.data is not None and reader.chunk_reads == len(np.unique(reader.rows // 8))  # chunks of 8 rows
    # one result per vector: removing one refits exactly that one
    key = plan.todo[2]
    run.fs.rm(run._path(f"fits/{LAYER}/{key}.json"))
    again = plan_fits(run.uri, config)
    assert again.todo == [key] and again.blocks == [(LAYER, [key])]


def test_blocks_respect_the_memory_budget():
    shape = [16, 16, 64]  # 64 KiB of float32 positions per image
    jobs = [
        {
            "layer": "l",
            "kind": "concept",
            "key": f"{k}{r}",
            "pos": [f"{k}{i}" for i in range(40)],
            "neg": [f"rand{r}_{i}" for i in range(40)],
        }
        for k in "abcd"
        for r in range(3)
    ]
    keys = [j["key"] for j in jobs]
    assert plan_blocks(jobs, keys, {"l": shape}, 1024) == [("l", keys)]
    # 16 MiB = 256 images; a concept group is 40 + 3 x 40 shared random images, each further concept 40 more
    small = plan_blocks(jobs, keys, {"l": shape}, 16)
    assert [len(k) for _, k in small] == [9, 3]  # whole groups (a concept's R sets) stay together
    for _, block in small:
        ids = {i for j in jobs if j["key"] in block for i in j["pos"] + j["neg"]}
        assert len(ids) * (64 * 1024 + len(block) * sweep.TABLE_BYTES) <= 16 * 2**20


def test_blocks_count_the_per_job_tables_of_a_wide_sweep():
    """Tiny positions, many jobs: the (image, job) tables of one solve decide the blocks."""
    shape = [1, 1, 4]  # 16 bytes of positions per image
    pool = [f"rand{r}_{i}" for r in range(30) for i in range(50)]
    jobs = [
        {
            "layer": "l",
            "kind": "concept",
            "key": f"c{k}_{r}",
            "pos": [f"c{k}_{i}" for i in range(50)],
            "neg": pool[r * 50 : (r + 1) * 50],
        }
        for k in range(100)
        for r in range(30)
    ]  # 3 000 jobs, 6 500 images
    keys = [j["key"] for j in jobs]
    blocks = plan_blocks(jobs, keys, {"l": shape}, 64)
    assert len(blocks) > 1 and sorted(k for _, b in blocks for k in b) == sorted(keys)
    for _, block in blocks:
        ids = {i for j in jobs if j["key"] in block for i in j["pos"] + j["neg"]}
        assert len(ids) * len(block) * sweep.TABLE_BYTES <= 64 * 2**20
        assert len(block) % 30 == 0  # whole concept groups


def anisotropic_mixing(seed: int = 1) -> np.ndarray:
    """Noise with a large, correlated variance, so that the Bayes direction Σ⁻¹u is far from u."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(C, C)))
    return q @ np.diag(np.geomspace(6.0, 0.3, C)) @ q.T


def concept_vectors(run, table):
    v = zarr.open_group(run.store_uri, mode="r")[f"vectors/{LAYER}/v"][...]
    return table[table["kind"] == "concept"], v


def test_mean_difference_agrees_with_logistic_under_isotropic_noise(tmp_path):
    run, config, u = planted_run(tmp_path, shift=2.0, fit={"solver": "mean_difference"})
    _, table = fit_all(run, config)
    concept, v = concept_vectors(run, table)
    for row in concept.itertuples():
        assert v[row.vector_row] @ u > 0.97
        assert row.cosine_to_logistic > 0.95  # sampling noise: 0.963-0.995 over planted seeds 0-7
        assert row.bal_acc == pytest.approx(row.bal_acc_logistic, abs=0.1)  # 3 held-out images per side
    assert set(table["solver"]) == {"mean_difference"}


@pytest.mark.parametrize("whiten", [False, True])
def test_mean_difference_differs_under_correlated_noise_and_whitening_recovers(tmp_path, whiten):
    mixing = anisotropic_mixing()
    run, config, u = planted_run(
        tmp_path,
        shift=1.5,
        mixing=mixing,
        n_concept=16,
        n_random=48,
        fit={"solver": "mean_difference", "whiten": whiten},
    )
    bayes = np.linalg.solve(mixing @ mixing.T, u)
    bayes /= np.linalg.norm(bayes)
    _, table = fit_all(run, config)
    concept, v = concept_vectors(run, table)
    for row in concept.itertuples():
        if whiten:
            assert v[row.vector_row] @ bayes > 0.97 and row.cosine_to_logistic > 0.97
        else:
            assert v[row.vector_row] @ bayes < 0.8 and row.cosine_to_logistic < 0.8
            assert row.bal_acc < row.bal_acc_logistic  # the exact vector separates better


def test_logistic_intercept_of_mean_difference_sits_on_the_boundary(tmp_path):
    run, config, u = planted_run(
        tmp_path, shift=2.0, fit={"solver": "mean_difference", "intercept": "logistic", "compare_logistic": False}
    )
    _, table = fit_all(run, config)
    group = zarr.open_group(run.store_uri, mode="r")
    v, b = group[f"vectors/{LAYER}/v"][...], group[f"vectors/{LAYER}/b"][...]
    act = group[f"guidance/{LAYER}/act"][...]
    row = int(table.loc[table["kind"] == "concept", "vector_row"].iloc[0])
    decision = np.einsum("nhwc,c->nhw", act, v[row]) + b[row]
    assert (decision[:12] > 0).mean() > 0.8 and (decision[12:] > 0).mean() < 0.2
    assert table["cosine_to_logistic"].isna().all()


@pytest.mark.parametrize("fit", [{"solver": "dask_ml"}, {"solver": "lbfgs", "max_positions_per_class": 60}])
def test_per_job_solvers_on_the_shared_read_match_reading_per_job(tmp_path, fit):
    run, config, _ = planted_run(tmp_path, shift=1.0, fit=fit)
    _, table = fit_all(run, config)
    coef = zarr.open_group(run.store_uri, mode="r")[f"vectors/{LAYER}/coef"][...]
    for job, row in checked_jobs(run, table):
        X, y, groups = job_positions(run, job)
        alone = OutOfCoreConceptVector(**fit, random_state=0).fit(X, y, groups)
        np.testing.assert_allclose(coef[row.vector_row], alone.coef_, rtol=1e-4, atol=1e-5)
        assert (row.n_pos, row.n_neg, row.bal_acc) == (
            alone.metrics_["n_pos"],
            alone.metrics_["n_neg"],
            alone.metrics_["bal_acc"],
        )


def test_a_streamed_block_gives_the_positions_of_a_resident_one(tmp_path):
    run, _, _ = planted_run(tmp_path)
    array = zarr.open_group(run.store_uri, mode="r")[f"guidance/{LAYER}/act"]
    rows = np.array([1, 2, 9, 17, 30, 31])
    local = np.array([0, 2, 3, 5])  # images rows[local] = 1, 9, 17, 31
    resident, streamed = sweep.PositionReader(array, rows, True), sweep.PositionReader(array, rows, False)
    assert streamed.data is None and streamed.chunk_reads == 0  # nothing read up front
    stacked = {}
    for name, reader in (("resident", resident), ("streamed", streamed)):
        x, image = map(np.concatenate, zip(*reader.blocks(local)()))
        order = np.argsort(image, kind="stable")
        stacked[name] = (x[order], image[order])
    np.testing.assert_array_equal(stacked["resident"][0], stacked["streamed"][0])
    np.testing.assert_array_equal(stacked["resident"][1], np.repeat(np.arange(4), 16))
    expected = array[...][rows[local]].reshape(-1, C)  # (4 * H * W, C), images in row order
    np.testing.assert_array_equal(stacked["streamed"][0], expected)
    assert streamed.chunk_reads == 4  # rows 1, 9, 17, 31 lie in 4 chunks of 8 rows, each read once
    wanted = np.array([False, True, False, False])  # only the image of row 9
    _, image = next(iter(streamed.blocks(local)(wanted)))
    assert streamed.chunk_reads == 5 and set(image) == {1}  # one more chunk read, that image's
    resident_blocks = list(resident.blocks(local, runs=np.array([0, 0, 1, 1]))(wanted))
    assert len(resident_blocks) == 1 and set(resident_blocks[0][1]) == {0, 1}  # the block of the wanted image only


def test_the_batched_solver_gives_the_same_result_on_any_number_of_threads():
    """Blocks are spread over threads and their partial sums added in block order: bit-identical."""
    from sacv.fit import solvers

    rng = np.random.default_rng(3)
    n_img, per, J = 40, 16, 3
    x = rng.normal(size=(n_img * per, C)).astype(np.float32)
    image = np.repeat(np.arange(n_img), per)
    pos = np.zeros((n_img, J), bool)
    pos[:12] = True
    x[image < 12] += 0.7
    weight = np.where(pos, 2.0, 1.0) * (rng.random((n_img, J)) > 0.2)  # some images out of some jobs
    sign = np.where(pos, 1.0, -1.0)

    def blocks(wanted=None):
        for a in range(0, len(x), 5 * per):  # 8 blocks
            yield x[a : a + 5 * per], image[a : a + 5 * per]

    counts = np.full(n_img, per)
    sums = np.add.reduceat(x.astype(np.float64), np.arange(0, len(x), per))
    squares = np.add.reduceat(x.astype(np.float64) ** 2, np.arange(0, len(x), per))
    mean, scale = solvers.job_moments(weight > 0, sums, squares, counts)
    results = [
        solvers.batched_logistic(
            blocks, solvers.LogisticJobs(weight, sign, mean, scale, counts), 1.0, True, 200, 1e-7, threads=t
        )
        for t in (1, 2, 5)
    ]
    for w, b, n_iter, passes in results[1:]:
        np.testing.assert_array_equal(w, results[0][0])
        np.testing.assert_array_equal(b, results[0][1])
        np.testing.assert_array_equal(n_iter, results[0][2])
        np.testing.assert_array_equal(passes, results[0][3])


def test_a_solve_runs_blas_single_threaded_in_its_threads_and_restores_it():
    """The limit holds in the solving thread and the threads it starts (the evaluation's workers),
    and the thread's setting is back afterwards."""
    import threading

    from threadpoolctl import threadpool_info

    from sacv.fit import solvers

    def blas_threads():
        return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})

    before, seen = blas_threads(), {}
    with solvers.single_threaded_blas():
        seen["solve"] = blas_threads()
        worker = threading.Thread(target=lambda: seen.setdefault("worker", blas_threads()))
        worker.start()
        worker.join()
    assert seen == {"solve": [1], "worker": [1]}
    assert blas_threads() == before


def test_the_logistic_terms_equal_scipys_at_every_margin():
    """``logistic_terms`` (the exact fit's per-position loss and slope) against SciPy's
    ``-log_expit(m)`` and ``expit(-m)``: ordinary, tiny, huge and signed-zero margins, where the
    naive ``log(1 + exp(-m))`` overflows or rounds to 0; NaN propagates; the input is untouched."""
    from scipy.special import expit, log_expit

    from sacv.method.logistic import logistic_terms

    rng = np.random.default_rng(3)
    margin = np.concatenate(
        [
            rng.standard_normal(2000) * 10.0 ** rng.integers(-3, 3, 2000),
            [0.0, -0.0, 1e-300, -1e-300, 36.0, -36.0, 40.0, 745.0, -745.0, 800.0, -800.0, 1e308, -1e308],
        ]
    )
    margin = margin.reshape(-1, 3, 1)  # the solver's (n, positions, k) shape
    before = margin.copy()
    loss, slope = logistic_terms(margin)
    np.testing.assert_allclose(loss, -log_expit(margin), rtol=4e-16, atol=0)
    np.testing.assert_array_equal(slope, expit(-margin))
    np.testing.assert_array_equal(margin, before)
    assert loss[margin < -700].min() > 700 and (loss >= 0).all()  # e^-m overflows there; the loss does not
    nan_loss, nan_slope = logistic_terms(np.array([np.nan, 1.0]))
    assert np.isnan(nan_loss[0]) and np.isnan(nan_slope[0]) and np.isfinite(nan_loss[1])


def test_the_one_objective_against_a_per_position_loop_and_finite_differences():
    """``weighted_logistic`` (the data term every exact solver computes) equals the per-position sum
    ``Σ s log(1 + e^{-y z})`` written as a loop, and its ``d/dz`` equals central differences of it;
    ``l2_penalty``'s gradient equals central differences of its value."""
    from sacv.method.logistic import l2_penalty, weighted_logistic

    rng = np.random.default_rng(5)
    n, p, k = 4, 3, 2
    z = rng.normal(scale=3.0, size=(n, p, k))
    y = rng.choice([-1.0, 1.0], size=(n, k))
    s = rng.uniform(0.0, 2.0, size=(n, k))
    loss, dz = weighted_logistic(z, y, s)
    slow = np.zeros(k)
    for i in range(n):
        for q in range(p):
            for j in range(k):
                slow[j] += s[i, j] * np.log(1.0 + np.exp(-y[i, j] * z[i, q, j]))
    np.testing.assert_allclose(loss, slow, rtol=1e-12)
    h = 1e-6
    for index in [(0, 0, 0), (2, 1, 1), (3, 2, 0)]:
        step = np.zeros_like(z)
        step[index] = h
        numeric = (weighted_logistic(z + step, y, s)[0] - weighted_logistic(z - step, y, s)[0]) / (2 * h)
        assert numeric[index[2]] == pytest.approx(dz[index], rel=1e-6, abs=1e-9)
        assert numeric[1 - index[2]] == pytest.approx(0.0, abs=1e-9)  # other jobs do not move
    w, penalty = rng.normal(size=(k, 5)), rng.uniform(0.5, 2.0, size=(k, 5))
    value, grad = l2_penalty(w, penalty)
    step = np.zeros_like(w)
    step[1, 3] = h
    numeric = (l2_penalty(w + step, penalty)[0] - l2_penalty(w - step, penalty)[0]) / (2 * h)
    assert numeric[1] == pytest.approx(grad[1, 3], rel=1e-6) and numeric[0] == 0.0
    np.testing.assert_allclose(value, 0.5 * (penalty * w**2).sum(axis=1), rtol=1e-14)
