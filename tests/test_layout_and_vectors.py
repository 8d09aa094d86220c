"""Per-position layout, planted concept directions (direction and sign), bad-input refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sacv.method.activations import channels_last
from sacv.method.vectors import NearChanceWarning, SpatialConceptVector, fit_concept_vector, spatial_samples


def test_sample_at_n_i_j_is_the_channel_vector_at_that_position():
    n, c, h, w = 3, 5, 4, 7
    # known values: act[n, ch, i, j] = 1000 n + 100 ch + 10 i + j  (all distinct, decodable)
    grid = np.meshgrid(np.arange(n), np.arange(c), np.arange(h), np.arange(w), indexing="ij")
    act = torch.tensor(1000 * grid[0] + 100 * grid[1] + 10 * grid[2] + grid[3], dtype=torch.float32)
    samples, image_index = spatial_samples(channels_last(act))
    assert samples.shape == (n * h * w, c)
    for ni in range(n):
        for i in range(h):
            for j in range(w):
                row = ni * h * w + i * w + j
                np.testing.assert_array_equal(samples[row], act[ni, :, i, j].numpy())
                assert image_index[row] == ni
    np.testing.assert_array_equal(spatial_samples(act, layout="NCHW")[0], samples)
    # the bug this guards against: a bare reshape of (C, H*W) mixes channels and positions
    wrong = act.reshape(n, c, h * w).reshape(n * h * w, c).numpy()
    assert not np.array_equal(wrong, samples)


def planted(seed: int, c: int = 8, n_img: int = 40, hw: int = 6, shift: float = 3.0):
    """Concept images whose positions are random ones moved by `shift` along a unit vector `u`."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=c)
    u /= np.linalg.norm(u)
    random_acts = rng.normal(size=(n_img, c, hw, hw))
    concept_acts = rng.normal(size=(n_img, c, hw, hw)) + shift * u[None, :, None, None]
    to_nhwc = lambda a: channels_last(torch.tensor(a, dtype=torch.float32))  # noqa: E731
    return u, to_nhwc(concept_acts), to_nhwc(random_acts)


@pytest.mark.parametrize("standardize", [False, True])
def test_planted_direction_recovered_with_positive_sign(standardize):
    u, concept, random = planted(seed=1)
    fitted = fit_concept_vector(concept, random, standardize=standardize, C=0.1, random_state=0)
    assert fitted.vector_ @ u >= 0.99
    assert np.isclose(np.linalg.norm(fitted.vector_), 1.0)
    assert fitted.metrics_["bal_acc"] > 0.85 and fitted.metrics_["auroc"] > 0.9
    # raw coefficient, intercept and unit vector agree: same decision everywhere
    X = spatial_samples(concept)[0]
    np.testing.assert_allclose(
        (X @ fitted.vector_ + fitted.offset_) * fitted.norm_, fitted.decision_function(X), rtol=1e-6, atol=1e-9
    )


def test_swapping_concept_and_random_flips_the_vector():
    u, concept, random = planted(seed=2)
    forward = fit_concept_vector(concept, random, random_state=0)
    backward = fit_concept_vector(random, concept, random_state=0)
    assert forward.vector_ @ u > 0.99 and backward.vector_ @ u < -0.99


def test_validation_is_grouped_by_image():
    from sacv.method.vectors import grouped_validation_split

    y = np.repeat([1, 1, 1, 0, 0, 0, 0], 9)
    groups = np.repeat(np.arange(7), 9)
    is_val = grouped_validation_split(y, groups, 0.3, seed=0)
    for g in range(7):
        assert len(set(is_val[groups == g])) == 1  # an image is wholly in or out
    assert is_val[y == 1].any() and is_val[y == 0].any()
    assert (~is_val[y == 1]).any() and (~is_val[y == 0]).any()


def test_subsampling_caps_training_positions_per_class():
    _, concept, random = planted(seed=3)
    fitted = fit_concept_vector(concept, random, max_positions_per_class=50, random_state=0)
    assert fitted.metrics_["n_pos"] == 50 and fitted.metrics_["n_neg"] == 50


def test_near_chance_vector_warns_and_is_flagged():
    _, concept, random = planted(seed=4, shift=0.0)
    with pytest.warns(NearChanceWarning, match="near chance"):
        fitted = fit_concept_vector(concept, random, random_state=0)
    assert fitted.near_chance_


def test_seed_makes_the_fit_reproducible():
    _, concept, random = planted(seed=5)
    a = fit_concept_vector(concept, random, random_state=7)
    b = fit_concept_vector(concept, random, random_state=7)
    np.testing.assert_array_equal(a.vector_, b.vector_)
    assert a.metrics_ == b.metrics_


def test_refuses_empty_identical_and_non_finite_inputs():
    _, concept, random = planted(seed=6)
    with pytest.raises(ValueError, match="at least one image"):
        fit_concept_vector(concept[:0], random)
    same = torch.ones(4, 3, 3, 8)
    with pytest.raises(ValueError, match="identical"):
        fit_concept_vector(same, same.clone())
    bad = concept.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_concept_vector(bad, random)
    with pytest.raises(ValueError, match="at least 2"):
        fit_concept_vector(concept[:1], random)


def test_estimator_follows_the_scikit_learn_contract():
    from sklearn.base import clone

    est = SpatialConceptVector(C=0.5, standardize=True, random_state=3)
    assert clone(est).get_params() == est.get_params()
    assert not hasattr(est, "coef_")
    _, concept, random = planted(seed=8)
    X = np.concatenate([spatial_samples(concept)[0], spatial_samples(random)[0]])
    y = np.repeat([1, 0], len(X) // 2)
    groups = np.repeat(np.arange(len(X) // 36), 36)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert est.fit(X, y, groups) is est
    assert (est.predict(X) == y).mean() > 0.85


def test_held_out_metrics_equal_scikit_learns():
    """The numpy metrics of every fitted vector against scikit-learn's own, ties and one class included."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    from sacv.method.vectors import held_out_metrics

    rng = np.random.default_rng(8)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        scores = np.round(rng.normal(size=n) + 0.8 * y, int(rng.integers(0, 3)))  # rounding makes ties
        if trial % 50 == 0:
            y[:] = 1  # one class only: scikit-learn's behaviour, warnings and errors included
        pred = (scores > 0).astype(int)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected_auc = roc_auc_score(y, scores)
            except ValueError:
                with pytest.raises(ValueError):
                    held_out_metrics(y, scores)
                continue
            got = held_out_metrics(y, scores)
            assert got["acc"] == pytest.approx(accuracy_score(y, pred))
            assert got["bal_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert got["auroc"] == pytest.approx(expected_auc, nan_ok=True)
