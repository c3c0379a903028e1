"""Randomized smoothing maths against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm

from service.gate.smoothing import (
    certified_radius, certify, certify_counts, clopper_pearson_lower, count_agreements,
)


def _bisection_lower(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson lower bound by definition: the p with P(X >= k | p) = alpha."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if binom.sf(k - 1, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("k, n, alpha", [
    (1, 1, 0.05), (7, 10, 0.05), (95, 100, 0.001), (400, 400, 0.001), (250, 400, 0.01),
    (3, 1000, 0.05), (999, 1000, 0.1)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int, alpha: float) -> None:
    # one-sided at 1 - alpha = lower end of the two-sided exact interval at 1 - 2 alpha
    ref = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(_bisection_lower(k, n, alpha),
                                                               abs=1e-9)


def test_clopper_pearson_edges() -> None:
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))
    with pytest.raises(ValueError):
        clopper_pearson_lower(11, 10, 0.05)
    with pytest.raises(ValueError):
        clopper_pearson_lower(1, 10, 0.0)


def test_radius_hand_values() -> None:
    assert certified_radius(0.9, 0.25) == pytest.approx(0.25 * 1.2815516, rel=1e-6)
    assert certified_radius(0.97725, 0.5) == pytest.approx(0.5 * 2.0, rel=1e-3)
    assert certified_radius(0.5000001, 1.0) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("p", [0.5, 0.3, 0.0])
def test_abstains_at_or_below_half(p: float) -> None:
    assert certified_radius(p, 0.25) is None


def test_certify_from_logits_counts_base_class() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(100, 10)).astype(np.float32)
    logits[:90, 3] += 100.0  # 90 copies keep class 3 ...
    logits[90:, 3] -= 100.0  # ... and 10 lose it
    assert count_agreements(logits, 3) == 90
    cert = certify(logits, label=3, sigma=0.25, alpha=0.001)
    assert (cert.label, cert.agreements, cert.samples, cert.budget) == (3, 90, 100, 100)
    assert cert.p_lower == pytest.approx(clopper_pearson_lower(90, 100, 0.001))
    assert cert.radius == pytest.approx(0.25 * float(norm.ppf(cert.p_lower)))
    assert cert.certifies(0.1) and not cert.certifies(1.0)


def test_certify_abstains_when_base_class_is_minority() -> None:
    logits = np.zeros((50, 3), dtype=np.float32)
    logits[:20, 1] = 5.0
    logits[20:, 2] = 5.0  # the majority is class 2, the candidate is class 1
    cert = certify(logits, label=1, sigma=0.25, alpha=0.001)
    assert cert.abstained and cert.radius is None and not cert.certifies(0.0)


def test_early_stop_bound_is_conservative() -> None:
    full = certify_counts(0, 180, 200, 200, 0.25, 0.001)
    early = certify_counts(0, 180, 200, 400, 0.25, 0.001)
    assert early.p_lower == pytest.approx(clopper_pearson_lower(180, 400, 0.001))
    assert early.p_lower < full.p_lower
    assert math.isclose(full.p_lower, clopper_pearson_lower(180, 200, 0.001))
    with pytest.raises(ValueError):
        certify_counts(0, 5, 4, 10, 0.25, 0.001)
