"""Each check on hand-built probabilities and features with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.gate.checks import (
    l1_distances, occlusion_score, softmax, squeeze_scores, structure_score, viewpoint_score,
)
from service.gate.density import DensityModel, fit_density
from service.gate.errors import CalibrationError
from service.gate.quantile import EmpiricalCDF, max_quantile


def test_softmax_known_values_and_stability() -> None:
    p = softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]], dtype=np.float32))
    assert p == pytest.approx(np.array([[0.25, 0.75], [0.5, 0.5]]))
    assert p.dtype == np.float64


def test_squeeze_centred_logit_l2_per_squeezer() -> None:
    base = np.array([3.0, 1.0, 0.0])
    squeezed = np.array([[3.0, 1.0, 0.0],     # unchanged
                         [8.0, 6.0, 5.0],     # shifted by 5: the same softmax, distance 0
                         [3.0, 1.0, 2.0],     # one logit up by 2: centred d = (-2, -2, 4) / 3
                         [2.0, 1.0, 0.0]])    # one logit down by 1
    assert squeeze_scores(base, squeezed) == pytest.approx(
        [0.0, 0.0, np.sqrt(24) / 3, np.sqrt(6) / 3])
    with pytest.raises(ValueError):
        squeeze_scores(base, np.zeros((2, 4)))


def test_squeeze_sees_a_confident_answer_move_that_softmax_hides() -> None:
    base = np.array([20.0, 0.0, 0.0])         # softmax ~ (1, 0, 0)
    squeezed = np.array([[12.0, 0.0, 0.0]])   # still ~ (1, 0, 0), logits moved by 8
    assert l1_distances(softmax(base), softmax(squeezed))[0] < 1e-3
    assert squeeze_scores(base, squeezed)[0] == pytest.approx(8 * np.sqrt(6) / 3)


def test_viewpoint_mean_l1() -> None:
    base = np.array([0.6, 0.4])
    views = np.array([[0.6, 0.4], [0.4, 0.6], [0.1, 0.9]])
    assert viewpoint_score(base, views) == pytest.approx((0.0 + 0.4 + 1.0) / 3)
    with pytest.raises(ValueError):
        viewpoint_score(base, np.zeros((0, 2)))
    with pytest.raises(ValueError):
        l1_distances(base, np.zeros((2, 3)))


def test_occlusion_largest_top1_drop() -> None:
    base = np.array([0.7, 0.2, 0.1])
    occluded = np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05]])
    assert occlusion_score(base, occluded) == pytest.approx(0.6)
    assert occlusion_score(base, np.array([[0.9, 0.05, 0.05]])) == pytest.approx(-0.2)


def test_structure_mean_surviving_top1() -> None:
    base = np.array([0.1, 0.8, 0.1])
    shuffled = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    assert structure_score(base, shuffled) == pytest.approx(0.4)


def _features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 200)
    centres = rng.normal(scale=5.0, size=(3, 4))
    mix = rng.normal(size=(4, 4))
    feats = centres[labels] + rng.normal(size=(600, 4)) @ mix
    return feats, labels


def test_mahalanobis_matches_direct_numpy() -> None:
    feats, labels = _features()
    model = fit_density(feats, labels, shrinkage=0.0)
    means = np.stack([feats[labels == c].mean(axis=0) for c in range(3)])
    resid = np.concatenate([feats[labels == c] - means[c] for c in range(3)])
    cov = resid.T @ resid / len(feats)
    x = np.array([1.0, -2.0, 0.5, 3.0])
    d = x - means[2]
    direct = float(np.sqrt(d @ np.linalg.solve(cov, d)))
    assert model.means == pytest.approx(means)
    assert model.distance(x, 2) == pytest.approx(direct, rel=1e-6)
    batch = model.distances(np.stack([x, means[1]]), [2, 1])
    assert batch[0] == pytest.approx(direct, rel=1e-6) and batch[1] == pytest.approx(0.0)
    for bad in ([2, -1], [2, 3]):  # -1 read the last class's mean, as numpy indexes
        with pytest.raises(ValueError, match="labels outside 0..2"):
            model.distances(np.stack([x, x]), bad)


def test_shrinkage_pulls_towards_scaled_identity() -> None:
    feats, labels = _features()
    model = fit_density(feats, labels, shrinkage=1.0)
    resid = feats - fit_density(feats, labels, shrinkage=0.0).means[labels]
    scale = np.trace(resid.T @ resid / len(feats)) / 4
    x = np.array([1.0, 1.0, 0.0, 0.0])
    expected = np.linalg.norm(x - model.means[0]) / np.sqrt(scale)
    assert model.distance(x, 0) == pytest.approx(expected, rel=1e-6)


def test_density_json_round_trip_and_errors() -> None:
    feats, labels = _features()
    model = fit_density(feats, labels)
    back = DensityModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert back == model and back.distance(feats[0], 0) == model.distance(feats[0], 0)
    with pytest.raises(CalibrationError, match="every class"):
        fit_density(feats, np.where(labels == 1, 2, labels))
    with pytest.raises(CalibrationError):
        DensityModel.from_dict({"means": [[0.0, 1.0]], "precision": [[1.0]]})
    with pytest.raises(CalibrationError):
        DensityModel.from_dict({"means": [[0.0]], "precision": [[1.0]], "extra": 1})
    # A precision that is no inverse covariance: a distance of 0 far from every mean, so the
    # density check would never flag.
    with pytest.raises(CalibrationError, match="positive definite"):
        DensityModel.from_dict({"means": [[0.0, 0.0]], "precision": [[-1.0, 0.0], [0.0, -1.0]]})
    with pytest.raises(CalibrationError, match="symmetric"):
        DensityModel.from_dict({"means": [[0.0, 0.0]], "precision": [[1.0, 0.5], [0.0, 1.0]]})


def test_empirical_cdf_maps_to_clean_quantiles() -> None:
    cdf = EmpiricalCDF.from_samples([3.0, 1.0, 2.0, 4.0])
    assert cdf.at(0.5) == 0.0
    assert cdf.at(2.0) == 0.5
    assert cdf.at(2.5) == 0.5
    assert cdf.at(9.0) == 1.0
    assert cdf(np.array([1.0, 4.0])) == pytest.approx([0.25, 1.0])
    assert EmpiricalCDF.from_dict(json.loads(json.dumps(cdf.to_dict()))) == cdf


def test_empirical_cdf_at_one_score_is_the_array_form() -> None:
    """at() bisects a list; the array form searches with numpy: the same value everywhere,
    ties, both ends and NaN (a NaN score reads as the highest quantile) included."""
    rng = np.random.default_rng(3)
    cdf = EmpiricalCDF.from_samples(np.round(rng.normal(size=500), 1))  # many ties
    xs = np.concatenate([cdf.values, np.nextafter(cdf.values, -np.inf), rng.normal(size=200) * 3,
                         [-np.inf, np.inf, np.nan, cdf.values[0], cdf.values[-1]]])
    assert [cdf.at(x) for x in xs] == cdf(xs).tolist()
    assert [cdf.at(float(x)) for x in xs[:50]] == cdf(xs[:50]).tolist()


def test_empirical_cdf_compression_keeps_the_ends() -> None:
    samples = np.random.default_rng(1).normal(size=10_000)
    cdf = EmpiricalCDF.from_samples(samples, max_points=101)
    assert cdf.values.size == 101
    assert cdf.values[0] == samples.min() and cdf.values[-1] == samples.max()
    assert cdf.at(float(np.quantile(samples, 0.9))) == pytest.approx(0.9, abs=0.011)


def test_empirical_cdf_refuses_bad_values() -> None:
    with pytest.raises(CalibrationError):
        EmpiricalCDF(np.array([2.0, 1.0]))
    with pytest.raises(CalibrationError):
        EmpiricalCDF.from_samples([])
    with pytest.raises(CalibrationError):
        EmpiricalCDF.from_dict({"values": [1.0, float("nan")]})


def test_max_quantile_takes_the_rarest_squeezer() -> None:
    cdfs = (EmpiricalCDF.from_samples(np.arange(10.0)),
            EmpiricalCDF.from_samples(np.arange(100.0)))
    raw = np.array([[4.0, 95.0], [9.0, 0.0]])
    assert max_quantile(raw, cdfs) == pytest.approx([0.96, 1.0])
    with pytest.raises(CalibrationError):
        max_quantile(np.zeros((2, 3)), cdfs)
