"""Thresholds from clean calibration scores, each check alone.

Pure functions over score arrays (the ``calibrate`` command computes the scores by running
the gate over the calibration split). A threshold ``t`` at clean rate ``r`` is the smallest
clean score value with ``mean(clean > t) <= r``: flags never exceed the target on the
calibration data, and fall short of it only by ties. For checks calibrated together under
one union rate, :func:`calibrate_thresholds` uses :mod:`service.gate.allocation`.

A rate met exactly on the calibration images is met only about half the time on the next
images, and less when the next images are harder. So :func:`calibrate_thresholds` aims at a
LOWER rate on the calibration data, :func:`rate_with_confidence`: the highest count of clean
flags whose one-sided Clopper-Pearson upper bound stays within the target at the given
confidence. The guarantee is exact for one check at one threshold and for images like the
calibration images; the allocation picks the union's thresholds among many candidates, so
there it is approximate, and it says nothing about a shift to harder images. Measured on
fmnist-cnn: thresholds met at exactly 5.0 % on 2,500 calibration images flagged 6.2 % of the
10,000 test images; at 95 % confidence (4.24 % on the calibration images) 5.33 %. The rest
of the gap is the test file being harder in the tails than the held-out part of the train
file.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.gate.allocation import allocate
from service.gate.checks import CHEAP_CHECKS, Check
from service.gate.errors import CalibrationError
from service.gate.policy import CheckPolicy, Policy, Thresholds
from service.gate.quantile import EmpiricalCDF
from service.gate.smoothing import clopper_pearson_lower

DEFAULT_FLAG_RATE = 0.05
DEFAULT_REJECT_RATE = 0.01
DEFAULT_ESCALATE_RATE = 0.20
DEFAULT_CONFIDENCE = 0.95


def clean_array(scores: ArrayLike, name: str = "scores") -> NDArray[np.float64]:
    """Validate clean scores: float [N], N >= 1, finite; returns float64."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise CalibrationError(f"{name}: expected a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise CalibrationError(f"{name}: contains non-finite values")
    return s


def threshold_at_rate(clean: ArrayLike, rate: float) -> float:
    """Smallest clean value ``t`` with ``mean(clean > t) <= rate``.

    clean: float [N] scores of clean images (higher = more suspicious); rate in [0, 1].
    Rate 0 gives ``max(clean)``: no clean image crosses.
    """
    s = np.sort(clean_array(clean))
    if not 0.0 <= rate <= 1.0:
        raise CalibrationError(f"rate must be in [0, 1], got {rate}")
    allowed = int(np.floor(rate * s.size + 1e-9))
    if allowed >= s.size:
        return float(s[0])
    # At most `allowed` values lie above s[n - allowed - 1] (ties do not cross), while any
    # smaller value would leave allowed + 1 values above it.
    return float(s[s.size - allowed - 1])


@functools.lru_cache(maxsize=256)
def rate_with_confidence(target: float, n: int, confidence: float | None) -> float:
    """The rate to calibrate at on ``n`` clean images so that the clean rate of the images
    they stand for stays within ``target`` with probability ``confidence``.

    Returns ``k / n`` for the largest count ``k`` whose one-sided Clopper-Pearson upper
    bound at ``confidence`` is ``<= target``; 0.0 when even ``k = 0`` is not (too few
    images for this target: the thresholds then flag no calibration image). ``confidence``
    None or 0 returns ``target`` itself (the point estimate).
    """
    if not 0.0 <= target <= 1.0:
        raise CalibrationError(f"rate must be in [0, 1], got {target}")
    if n < 1:
        raise CalibrationError(f"need at least one clean image, got {n}")
    if not confidence:
        return target
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence

    def upper(k: int) -> float:  # upper bound on the flag rate after k flags in n
        return 1.0 - clopper_pearson_lower(n - k, n, alpha)

    lo, hi = -1, n  # upper(-1) counts as <= target, upper(n) = 1 > target unless target is 1
    if target >= 1.0:
        return 1.0
    while hi - lo > 1:  # the bound grows with k: bisect for the last k within the target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if upper(mid) <= target else (lo, mid)
    return max(lo, 0) / n


def flag_rate(scores: ArrayLike, threshold: float | None) -> float:
    """Share of ``scores`` (float [N]) crossing ``threshold`` (score > threshold)."""
    s = clean_array(scores)
    return 0.0 if threshold is None else float(np.mean(s > threshold))


def thresholds_at_rates(clean: ArrayLike, *, flag: float = DEFAULT_FLAG_RATE,
                        reject: float = DEFAULT_REJECT_RATE,
                        escalate: float | None = DEFAULT_ESCALATE_RATE) -> Thresholds:
    """Flag, reject (and escalate) thresholds of one check alone at clean rates.

    Requires ``reject <= flag <= escalate`` rates, which orders the thresholds the other way.
    """
    if not reject <= flag or (escalate is not None and escalate < flag):
        raise CalibrationError("rates must satisfy reject <= flag <= escalate")
    return Thresholds(
        flag=threshold_at_rate(clean, flag), reject=threshold_at_rate(clean, reject),
        escalate=None if escalate is None else threshold_at_rate(clean, escalate))


def with_thresholds(policy: Policy, thresholds: Mapping[Check, Thresholds], *,
                    enable: bool | None = None) -> Policy:
    """A copy of ``policy`` with new thresholds for the given checks (others unchanged).

    enable: switch those checks on (True) or off (False); None keeps their state.
    """
    checks = dict(policy.checks)
    for check, t in thresholds.items():
        old = checks[check]
        checks[check] = CheckPolicy(enabled=old.enabled if enable is None else enable,
                                    thresholds=t)
    return replace(policy, checks=checks)


def fit_squeeze_references(raw: ArrayLike, max_points: int | None = 4096
                           ) -> tuple[EmpiricalCDF, ...]:
    """One clean CDF per squeezer from raw clean L1 scores float [N, S] (plan order)."""
    r = np.asarray(raw, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise CalibrationError(f"squeeze scores must be [N, S], got shape {r.shape}")
    return tuple(EmpiricalCDF.from_samples(r[:, s], max_points) for s in range(r.shape[1]))


@dataclass(frozen=True)
class CalibrationResult:
    """Thresholds per check and a JSON-able summary of targets and realised rates on the
    calibration data (goes into ``Policy.calibration``)."""

    thresholds: Mapping[Check, Thresholds]
    summary: Mapping[str, float | int | str | bool]


def calibrate_thresholds(clean: Mapping[Check, ArrayLike],
                         attacked: Mapping[Check, ArrayLike] | None = None, *,
                         weights: ArrayLike | None = None,
                         flag_rate: float = DEFAULT_FLAG_RATE,
                         reject_rate: float = DEFAULT_REJECT_RATE,
                         escalate_rate: float | None = DEFAULT_ESCALATE_RATE,
                         confidence: float | None = DEFAULT_CONFIDENCE
                         ) -> CalibrationResult:
    """Thresholds for the enabled checks, in their score units (policy docstring).

    clean / attacked: per check float [N] / [M] scores, one per image, same image order in
    every array. With ``attacked``, flag and reject thresholds are ALLOCATED
    (:func:`service.gate.allocation.allocate`): the union of all checks flags at most
    ``flag_rate`` (``reject_rate``) of clean images, and reject thresholds are never below
    flag ones. Without it, each check alone is set at the rates (the union rate is then
    higher). Escalate thresholds (cheap checks only: they decide when noise runs): each check
    alone at ``escalate_rate``, capped at its flag threshold. weights: float [M] per
    attacked image for the allocation (None: equal).

    confidence: the flag and reject rates are first lowered with :func:`rate_with_confidence`
    (None or 0: used as given). The summary keeps the targets and the rates calibrated at.
    """
    if not 0 <= reject_rate <= flag_rate <= 1:
        raise CalibrationError("need 0 <= reject_rate <= flag_rate <= 1")
    checks = [c for c in Check if c in clean]
    n = int(clean_array(clean[checks[0]]).size) if checks else 0
    summary: dict[str, float | int | str | bool] = {
        "flag_rate_target": flag_rate, "reject_rate_target": reject_rate,
        "clean_images": n, "confidence": float(confidence or 0.0)}
    if n:
        flag_rate = rate_with_confidence(flag_rate, n, confidence)
        reject_rate = rate_with_confidence(reject_rate, n, confidence)
    summary.update({"flag_rate_calibrated": flag_rate, "reject_rate_calibrated": reject_rate})
    flag: dict[Check, float | None]
    reject: dict[Check, float | None]
    if attacked is None:
        flag, reject = {}, {}
        for c in checks:
            f = threshold_at_rate(clean[c], flag_rate)
            flag[c], reject[c] = f, max(threshold_at_rate(clean[c], reject_rate), f)
        summary["method"] = "each-alone"
    else:
        fa = allocate(clean, attacked, flag_rate, weights=weights)
        ra = allocate(clean, attacked, reject_rate, floors=fa.thresholds, weights=weights)
        flag, reject = dict(fa.thresholds), dict(ra.thresholds)
        summary.update({"method": f"allocated:{fa.method}",
                        "attacked_images": int(np.asarray(attacked[checks[0]]).size),
                        "flag_rate_clean": fa.clean_rate, "flag_detection": fa.detection_rate,
                        "reject_rate_clean": ra.clean_rate,
                        "reject_detection": ra.detection_rate})
    out: dict[Check, Thresholds] = {}
    for c in checks:
        f, esc = flag[c], None
        if escalate_rate is not None and f is not None and c in CHEAP_CHECKS:
            esc = min(threshold_at_rate(clean[c], escalate_rate), f)
        out[c] = Thresholds(flag=f, reject=reject[c], escalate=esc)
    return CalibrationResult(thresholds=out, summary=summary)
