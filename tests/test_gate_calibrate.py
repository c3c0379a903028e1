"""Thresholds at target clean rates, and the shared-budget allocation."""

from __future__ import annotations

import numpy as np
import pytest

from service.gate.allocation import allocate
from service.gate.calibrate import (
    calibrate_thresholds, fit_squeeze_references, flag_rate, rate_with_confidence,
    threshold_at_rate, thresholds_at_rates, with_thresholds,
)
from service.gate.checks import Check
from service.gate.errors import CalibrationError

S, V, D = Check.SQUEEZE, Check.VIEWPOINT, Check.DENSITY


def test_threshold_at_rate_exact_counts() -> None:
    clean = np.arange(1.0, 101.0)
    t = threshold_at_rate(clean, 0.05)
    assert t == 95.0 and np.count_nonzero(clean > t) == 5
    assert threshold_at_rate(clean, 0.0) == 100.0
    ties = np.array([0.0] * 90 + [1.0] * 10)
    t = threshold_at_rate(ties, 0.05)  # cannot split the tie at 1.0: flags none of them
    assert t == 1.0 and flag_rate(ties, t) == 0.0
    with pytest.raises(CalibrationError):
        threshold_at_rate([0.0, np.nan], 0.05)
    with pytest.raises(CalibrationError):
        threshold_at_rate([], 0.05)


@pytest.mark.parametrize("rate", [0.05, 0.01])
def test_calibrated_rate_holds_on_fresh_clean_data(rate: float) -> None:
    rng = np.random.default_rng(3)
    fit, fresh = rng.gamma(2.0, size=20_000), rng.gamma(2.0, size=20_000)
    t = threshold_at_rate(fit, rate)
    assert flag_rate(fit, t) <= rate
    sd = np.sqrt(rate * (1 - rate) * (2 / 20_000))
    assert abs(flag_rate(fresh, t) - rate) < 4 * sd


def test_thresholds_at_rates_are_ordered() -> None:
    clean = np.random.default_rng(0).normal(size=5000)
    t = thresholds_at_rates(clean)
    assert t.escalate is not None and t.flag is not None and t.reject is not None
    assert t.escalate <= t.flag <= t.reject
    assert flag_rate(clean, t.flag) == pytest.approx(0.05, abs=1e-3)


def _synthetic(seed: int, n: int = 4000, m: int = 2000) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    clean = {S: rng.normal(size=n), V: rng.normal(size=n)}
    attacked = {S: rng.normal(loc=2.0, size=m),  # useful: attacks score high
                V: rng.normal(size=m)}  # useless: attacks look clean
    return clean, attacked


def _union(scores: dict, thresholds: dict) -> float:
    hit = np.zeros(len(next(iter(scores.values()))), bool)
    for c, t in thresholds.items():
        if t is not None:
            hit |= scores[c] > t
    return float(hit.mean())


def test_allocation_beats_the_equal_split_when_one_check_is_useless() -> None:
    clean, attacked = _synthetic(0)
    alloc = allocate(clean, attacked, 0.05)
    equal = {c: threshold_at_rate(clean[c], 0.025) for c in clean}
    assert _union(clean, equal) <= 0.05
    assert alloc.clean_rate <= 0.05 and alloc.clean_rate >= 0.05 - 2 / 4000
    assert alloc.clean_rate == pytest.approx(_union(clean, alloc.thresholds))
    assert alloc.detection_rate == pytest.approx(_union(attacked, alloc.thresholds))
    assert alloc.detection_rate >= _union(attacked, equal) + 0.05
    assert alloc.rates[S] > alloc.rates[V]
    fresh_clean, fresh_attacked = _synthetic(1)
    assert abs(_union(fresh_clean, alloc.thresholds) - 0.05) < 0.015
    assert _union(fresh_attacked, alloc.thresholds) >= _union(fresh_attacked, equal)


def test_allocation_uses_both_checks_when_both_help() -> None:
    rng = np.random.default_rng(5)
    n, m = 4000, 2000
    clean = {S: rng.normal(size=n), V: rng.normal(size=n), D: rng.normal(size=n)}
    half = m // 2
    attacked = {S: np.r_[rng.normal(3.0, size=half), rng.normal(size=half)],
                V: np.r_[rng.normal(size=half), rng.normal(3.0, size=half)],
                D: rng.normal(size=m)}
    alloc = allocate(clean, attacked, 0.05)
    alone = max(allocate({c: clean[c]}, {c: attacked[c]}, 0.05).detection_rate
                for c in (S, V))
    assert alloc.detection_rate > alone + 0.2
    assert alloc.clean_rate <= 0.05


def test_allocation_finds_the_useful_pair_among_many_checks() -> None:
    rng = np.random.default_rng(8)
    n, m = 4000, 2000
    checks = (S, V, D, Check.OCCLUSION, Check.STRUCTURE)
    clean = {c: rng.normal(size=n) for c in checks}
    half = m // 2
    attacked = {c: rng.normal(size=m) for c in checks}  # useless by default ...
    attacked[S] = np.r_[rng.normal(3.0, size=half), rng.normal(size=half)]  # ... but these two
    attacked[D] = np.r_[rng.normal(size=half), rng.normal(3.0, size=half)]  # catch halves
    alloc = allocate(clean, attacked, 0.05)
    equal = {c: threshold_at_rate(clean[c], 0.05 / len(checks)) for c in checks}
    alone = max(_union(attacked, {c: threshold_at_rate(clean[c], 0.05)}) for c in checks)
    assert alloc.clean_rate <= 0.05
    assert alloc.detection_rate > _union(attacked, equal) + 0.05
    assert alloc.detection_rate > alone + 0.2
    assert alloc.rates[S] + alloc.rates[D] > 0.04


def test_reject_floors_keep_reject_above_flag() -> None:
    clean, attacked = _synthetic(2)
    flag = allocate(clean, attacked, 0.05)
    floors = dict(flag.thresholds)
    floors[V] = None  # no flag threshold: no reject threshold either
    reject = allocate(clean, attacked, 0.01, floors=floors)
    assert reject.thresholds[V] is None
    assert reject.thresholds[S] is not None and flag.thresholds[S] is not None
    assert reject.thresholds[S] >= flag.thresholds[S]
    assert reject.clean_rate <= 0.01


def test_calibrate_thresholds_with_attacks() -> None:
    clean, attacked = _synthetic(4)
    result = calibrate_thresholds(clean, attacked)
    for c, t in result.thresholds.items():
        if t.flag is not None:
            assert t.reject is None or t.reject >= t.flag
            assert t.escalate is not None and t.escalate <= t.flag
    flags = {c: t.flag for c, t in result.thresholds.items()}
    rejects = {c: t.reject for c, t in result.thresholds.items()}
    assert _union(clean, flags) <= 0.05 and _union(clean, rejects) <= 0.01
    assert result.summary["flag_rate_clean"] == pytest.approx(_union(clean, flags))
    assert str(result.summary["method"]).startswith("allocated:")


def test_the_noise_check_calibrates_without_an_escalate_threshold() -> None:
    # Escalate thresholds decide when noise runs: the cheap checks get one, noise none (a
    # policy refuses one there), so a policy calibrated with noise on loads.
    from tests.test_gate_policy import make_policy

    rng = np.random.default_rng(5)
    clean = {S: rng.random(2000), Check.NOISE: rng.random(2000) * 0.2}
    attacked = {S: rng.random(300) * 0.5 + 0.5, Check.NOISE: rng.random(300)}
    result = calibrate_thresholds(clean, attacked)
    assert result.thresholds[S].escalate is not None
    assert result.thresholds[Check.NOISE].escalate is None and result.thresholds[Check.NOISE].flag is not None
    policy = with_thresholds(make_policy(), result.thresholds, enable=True)
    assert policy.enabled(Check.NOISE) and policy.thresholds(Check.NOISE) == result.thresholds[Check.NOISE]


def test_calibrate_thresholds_each_alone_without_attacks() -> None:
    clean, _ = _synthetic(6)
    result = calibrate_thresholds(clean, confidence=None)
    for c, t in result.thresholds.items():
        assert flag_rate(clean[c], t.flag) == pytest.approx(0.05, abs=1e-3)
        assert flag_rate(clean[c], t.reject) == pytest.approx(0.01, abs=1e-3)
    assert result.summary["method"] == "each-alone"


def test_weights_let_a_small_reference_set_count_as_much_as_a_large_one() -> None:
    # 2,000 "shifted" images only V sees, 200 "attacks" only S sees; V and S are moderately
    # separating, so the budget cannot catch both sets fully.
    rng = np.random.default_rng(3)
    n = 4000
    clean = {S: rng.normal(size=n), V: rng.normal(size=n)}
    attacked = {S: np.r_[rng.normal(size=2000), rng.normal(1.5, size=200)],
                V: np.r_[rng.normal(1.5, size=2000), rng.normal(size=200)]}
    small = np.r_[np.zeros(2000, bool), np.ones(200, bool)]

    def caught(thresholds: dict) -> tuple[float, float]:
        hit = np.zeros(small.size, bool)
        for c, t in thresholds.items():
            if t is not None:
                hit |= attacked[c] > t
        return float(hit[~small].mean()), float(hit[small].mean())

    by_count = allocate(clean, attacked, 0.05)
    per_set = np.where(small, 1 / 200, 1 / 2000)
    by_set = allocate(clean, attacked, 0.05, weights=per_set)
    assert by_count.rates[V] > by_count.rates[S]     # the big set wins the budget
    assert by_set.rates[S] >= by_set.rates[V] * 0.5  # the small one gets its share
    big_c, small_c = caught(by_count.thresholds)
    big_s, small_s = caught(by_set.thresholds)
    assert small_s > small_c + 0.05
    assert by_set.clean_rate <= 0.05
    assert by_set.detection_rate == pytest.approx((big_s + small_s) / 2)
    # All-equal weights are the unweighted allocation.
    assert allocate(clean, attacked, 0.05, weights=np.full(2200, 7.0)).thresholds \
        == by_count.thresholds


def test_allocation_input_errors() -> None:
    clean, attacked = _synthetic(7)
    with pytest.raises(CalibrationError):
        allocate(clean, {S: attacked[S]}, 0.05)
    with pytest.raises(CalibrationError):
        allocate({S: clean[S], V: clean[V][:10]}, attacked, 0.05)
    with pytest.raises(CalibrationError):
        allocate(clean, attacked, 1.5)
    for bad in (np.ones(3), -np.ones(2000), np.zeros(2000), np.full(2000, np.nan)):
        with pytest.raises(CalibrationError, match="weights"):
            allocate(clean, attacked, 0.05, weights=bad)


def test_fit_squeeze_references_one_cdf_per_squeezer() -> None:
    raw = np.random.default_rng(0).random((500, 4)) * np.array([1.0, 2.0, 3.0, 4.0])
    cdfs = fit_squeeze_references(raw)
    assert len(cdfs) == 4
    assert [c.values[-1] for c in cdfs] == pytest.approx(raw.max(axis=0).tolist())


def test_rate_with_confidence_is_the_last_count_within_the_bound() -> None:
    from scipy.stats import beta

    for n, target in ((2500, 0.05), (2500, 0.01), (400, 0.05), (5000, 0.2)):
        k = round(rate_with_confidence(target, n, 0.95) * n)
        assert 0 < k < target * n
        assert beta.ppf(0.95, k + 1, n - k) <= target < beta.ppf(0.95, k + 2, n - k - 1)
    assert rate_with_confidence(0.05, 2500, None) == 0.05
    assert rate_with_confidence(0.01, 100, 0.95) == 0.0  # 0 flags in 100 bounds the rate at 3 %
    with pytest.raises(CalibrationError):
        rate_with_confidence(0.05, 0, 0.95)
    with pytest.raises(CalibrationError):
        rate_with_confidence(0.05, 100, 1.0)


def test_confidence_keeps_the_true_flag_rate_within_target() -> None:
    """Clean scores uniform on [0, 1]: a threshold t flags 1 - t of all clean images. Over
    many calibration draws, thresholds at the point rate overshoot the target about half the
    time; at 90 % confidence at most about a tenth of the time."""
    rng = np.random.default_rng(11)
    over = {None: 0, 0.9: 0}
    draws = 400
    for _ in range(draws):
        clean = {S: rng.random(1000)}
        for conf in over:
            t = calibrate_thresholds(clean, confidence=conf, escalate_rate=None).thresholds[S]
            assert t.flag is not None
            over[conf] += (1.0 - t.flag) > 0.05
    assert over[None] / draws > 0.3
    assert over[0.9] / draws <= 0.1 + 3 * (0.1 * 0.9 / draws) ** 0.5


def test_calibrate_thresholds_records_targets_and_calibrated_rates() -> None:
    clean, attacked = _synthetic(8)
    result = calibrate_thresholds(clean, attacked, confidence=0.95)
    s = result.summary
    n = int(s["clean_images"])
    assert s["flag_rate_target"] == 0.05 and s["confidence"] == 0.95
    assert s["flag_rate_calibrated"] == rate_with_confidence(0.05, n, 0.95) < 0.05
    assert s["flag_rate_clean"] <= s["flag_rate_calibrated"]
    assert s["reject_rate_clean"] <= s["reject_rate_calibrated"] < 0.01


def test_a_squeeze_threshold_stuck_at_its_ceiling_is_warned_of() -> None:
    """The squeeze score is a clean quantile, 1.0 above every reference. When more threshold
    images sit at 1.0 than the reject rate lets cross, the reject threshold can only be 1.0
    (or none), never crossed: calibration says so, and stays quiet when the tail has room."""
    from service.calibration import squeeze_ceiling_warning

    rng = np.random.default_rng(3)
    attacked = {S: np.ones(200)}  # every attack far above the references: at the ceiling too

    def stuck(n: int, at_ceiling: int, rate: float) -> tuple[bool, str | None]:
        clean = np.concatenate([rng.random(n - at_ceiling) * 0.999, np.ones(at_ceiling)])
        t = calibrate_thresholds({S: clean}, attacked, flag_rate=0.05, reject_rate=rate).thresholds[S]
        can_reject = t.reject is not None and bool((attacked[S] > t.reject).any())
        return can_reject, squeeze_ceiling_warning(clean, "reject", rate)

    can_reject, warning = stuck(500, 6, 0.002)  # 6 at 1.0; the rate lets 1 of 500 cross
    assert not can_reject and warning is not None and "6 of 500" in warning and "cannot reject" in warning
    can_reject, warning = stuck(2000, 2, 0.01)  # 2 at 1.0; the rate lets 20 of 2,000 cross
    assert can_reject and warning is None
    assert squeeze_ceiling_warning(np.ones(10), "flag", 0.0) is None  # no rate asked for


def test_the_viewpoint_check_uses_the_views_the_card_measured_to_keep_the_label() -> None:
    """The card's list decides: a mirror image it marks as keeping the label is probed (it was
    dropped), and a card marking none leaves no views, where all six were probed (each of
    them a transform the card said changes the label)."""
    from service.calibration import VIEW_NAMES, label_preserving_views
    from service.gate.defaults import DEFAULT_VIEWS
    from service.gate.plan import ViewSpec

    def card(*names: str) -> dict:
        return {"label_preserving_transforms": [{"name": n} for n in names]}

    assert label_preserving_views(card(*VIEW_NAMES, "scale0.9")) == DEFAULT_VIEWS
    assert label_preserving_views(card("rotate-10", "hflip")) == (DEFAULT_VIEWS[1], ViewSpec(hflip=True))
    assert label_preserving_views(card("vflip", "scale1.1")) == ()


def test_noise_is_calibrated_on_the_copies_the_gateway_scores() -> None:
    """The share of k disagreeing copies spreads less the more copies there are: thresholds
    set on one count and read on another miss their clean rate. The calibration probes as
    many as the policy's ``noise.detect_samples``, the count the cascade scores."""
    from dataclasses import replace

    from service.calibration import calibration_spec
    from service.gate.defaults import draft_policy
    from service.gate.policy import NoiseSettings

    policy = draft_policy("m", "a" * 64, "b" * 64, 0.25)
    assert calibration_spec(policy, 0, [Check.NOISE]).noise.count == policy.noise.detect_samples == 32
    wider = replace(policy, noise=NoiseSettings(sigma=0.25, detect_samples=48))
    assert calibration_spec(wider, 0, [Check.NOISE, S]).noise.count == 48
    assert calibration_spec(wider, 0, [S]).noise.count == 0


def test_calibrating_noise_beside_cheap_checks_warns_that_its_rates_assume_every_image() -> None:
    """The budget is shared on every image's noise score, but the cascade scores noise only
    where a cheap check escalates (a review's synthetic case: calibrated to catch all attacks,
    served it caught a third): the calibration says so. Alone, noise is scored everywhere."""
    from service.calibration import DEFAULT_CHECKS, cascade_warning

    assert "noise is calibrated as if it scored every image" in cascade_warning([*DEFAULT_CHECKS, Check.NOISE])
    assert cascade_warning([Check.NOISE]) is None
    assert cascade_warning(DEFAULT_CHECKS) is None


def test_the_calibration_command_refuses_in_one_line(tiny_store, tmp_path) -> None:
    """TorchServe not there (no key file), or a model the store does not hold: one line and
    exit 1, never a traceback."""
    import shutil
    import subprocess
    import sys

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    base = [sys.executable, "-m", "service.calibration", "--store", str(store), "--key-file", str(tmp_path / "none.json")]
    for args, said in ((["--model", "fmnist-cnn", "--address", "127.0.0.1:1"], "cannot read TorchServe's key file"),
                       (["--model", "nope"], "not in manifest: nope/card.json")):
        r = subprocess.run(base + args, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().startswith("error: ") and said in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_clean_rate_calibrated_far_under_its_target_is_warned_of() -> None:
    """The confidence margin makes the flag rate a one-sided bound: on few threshold images
    the rate to expect on clean traffic (the order statistic's mean) sits more than a point
    under the target, outside the 5 +- 1 % band: said at calibration. The default 2,500 are
    inside it."""
    from service.calibration import expected_rate_warning
    from service.gate.calibrate import rate_with_confidence

    for images, warned in ((2500, False), (1000, True), (300, True)):
        got = rate_with_confidence(0.05, images, 0.95)
        warning = expected_rate_warning("flag", 0.05, got, images)
        assert (warning is not None) == warned, (images, got, warning)
    assert "expect about 3.90%" in expected_rate_warning("flag", 0.05, rate_with_confidence(0.05, 1000, 0.95), 1000)
    assert expected_rate_warning("flag", 0.0, 0.0, 300) is None  # no rate asked for
