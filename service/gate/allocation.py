"""Sharing one clean flag budget among checks to catch the most attacks.

An image is flagged when ANY enabled check crosses its threshold, so what matters is the
UNION clean flag rate: every check takes part of it. Given each check's scores on clean
calibration images and on a reference set of attacked images, :func:`allocate` picks
per-check thresholds whose union clean rate stays within the total target (as close to it
as the data allow) and flags the largest share of attacked images. Attacked images can carry
weights, so that a reference set counts for what it stands for rather than for how many of
its images there happen to be (1,000 rotations would otherwise outvote 170 successful
attacks, and the budget would go to the checks that see rotations).

Search: a greedy walk that lowers, step by step, the threshold whose move buys the most newly
caught attacks per newly flagged clean image (steps of 1, 2, 4, ... clean images, so a check
whose gains come late is not blind-sided), then spends what is left of the budget on the
checks that catch the most attacks alone. Its result competes, on the actual union, with the
equal split, every check alone and (for up to three checks) a grid over budget shares; the
best wins, so the allocation is never worse than the equal split on the reference data.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.gate.checks import Check
from service.gate.errors import CalibrationError

_F64 = NDArray[np.float64]


@dataclass(frozen=True)
class Allocation:
    """Per-check thresholds (None = never crosses) and what they achieve on the data:
    clean_rate is the union clean rate, detection_rate the share of attacked images caught,
    rates each check's own clean rate; method names the candidate that won."""

    thresholds: Mapping[Check, float | None]
    clean_rate: float
    detection_rate: float
    rates: Mapping[Check, float]
    method: str


def attack_weights(weights: ArrayLike | None, m: int) -> NDArray[np.float64]:
    """Per-attacked-image weights float [m] (None: all equal), normalised to sum to 1.

    Raises CalibrationError unless they are finite, non-negative and not all 0.
    """
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (m,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise CalibrationError(f"weights must be [{m}] finite, non-negative, not all 0")
    return np.asarray(w / w.sum(), dtype=np.float64)


class _Data:
    """Clean [N, k] and attacked [M, k] score matrices with per-check sorted clean values."""

    def __init__(self, clean: Mapping[Check, ArrayLike], attacked: Mapping[Check, ArrayLike],
                 floors: Mapping[Check, float | None], weights: ArrayLike | None = None) -> None:
        if not clean or set(clean) != set(attacked):
            raise CalibrationError("clean and attacked scores must cover the same checks")
        self.checks = tuple(c for c in Check if c in clean)
        cols_c = [_finite(clean[c], f"clean[{c}]") for c in self.checks]
        cols_a = [_finite(attacked[c], f"attacked[{c}]") for c in self.checks]
        if len({x.size for x in cols_c}) > 1 or len({x.size for x in cols_a}) > 1:
            raise CalibrationError("every check needs one score per image: arrays of the "
                                   "clean (and of the attacked) set must have equal lengths")
        self.clean = np.stack(cols_c, axis=1)
        self.attacked = np.stack(cols_a, axis=1)
        # detection rates are weighted shares of the attacked set
        self.weights = attack_weights(weights, self.attacked.shape[0])
        self.sorted = [np.sort(self.clean[:, i]) for i in range(len(self.checks))]
        # A floor of None blocks the check (reject without a flag threshold); absent = free.
        self.floors: list[float | None] = [floors[c] if c in floors else -np.inf
                                           for c in self.checks]

    @property
    def n(self) -> int:
        return int(self.clean.shape[0])

    def threshold(self, i: int, allowed: int) -> float | None:
        """Check i's threshold letting at most ``allowed`` clean images cross (-1: never),
        raised to its floor."""
        floor = self.floors[i]
        if allowed < 0 or floor is None:
            return None
        return max(float(self.sorted[i][self.n - 1 - min(allowed, self.n - 1)]), floor)

    def union(self, thresholds: list[float | None]) -> tuple[int, float]:
        """(clean images flagged, share of attacked flagged) by the union."""
        return (int(_crossing(self.clean, thresholds).sum()),
                float(self.weights[_crossing(self.attacked, thresholds)].sum()))


def _finite(a: ArrayLike, name: str) -> _F64:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise CalibrationError(f"{name}: expected a non-empty 1-D array of finite scores")
    return x


def _crossing(scores: _F64, thresholds: list[float | None]) -> NDArray[np.bool_]:
    """Rows of scores [R, k] where any column crosses its threshold (None never)."""
    out = np.zeros(scores.shape[0], dtype=bool)
    for i, t in enumerate(thresholds):
        if t is not None:
            out |= scores[:, i] > t
    return out


def _greedy(data: _Data, allowed_total: int) -> list[float | None]:
    k = len(data.checks)
    pos = [-1] * k
    thr: list[float | None] = [None] * k
    cover_c = np.zeros(data.n, dtype=np.int64)
    cover_a = np.zeros(data.attacked.shape[0], dtype=np.int64)
    w = data.weights
    used = 0
    while True:
        best: tuple[tuple[float, float, float], int, int] | None = None
        for i in range(k):
            col_c, col_a = data.clean[:, i], data.attacked[:, i]
            old_c = col_c > thr[i] if thr[i] is not None else np.zeros(data.n, bool)
            old_a = col_a > thr[i] if thr[i] is not None else np.zeros(col_a.size, bool)
            step = 1
            while pos[i] + step <= data.n - 1:
                j = pos[i] + step
                step *= 2
                t = data.threshold(i, j)
                if t is None or (thr[i] is not None and t >= thr[i]):
                    continue
                new_c = (col_c > t) & ~old_c
                d_clean = int(np.count_nonzero(new_c & (cover_c == 0)))
                if used + d_clean > allowed_total:
                    break
                d_att = float(w[(col_a > t) & ~old_a & (cover_a == 0)].sum())
                if d_clean == 0 and d_att == 0:
                    continue
                alone = float(w[col_a > t].sum())
                ratio = float("inf") if d_clean == 0 else d_att / d_clean
                key = (ratio, -float(d_clean) if d_att == 0 else 0.0, alone)
                if best is None or key > best[0]:
                    best = (key, i, j)
        if best is None:
            return thr
        _, i, j = best
        t = data.threshold(i, j)
        assert t is not None
        old_c = data.clean[:, i] > thr[i] if thr[i] is not None else np.zeros(data.n, bool)
        old_a = (data.attacked[:, i] > thr[i] if thr[i] is not None
                 else np.zeros(data.attacked.shape[0], bool))
        new_c = (data.clean[:, i] > t) & ~old_c
        used += int(np.count_nonzero(new_c & (cover_c == 0)))
        cover_c += new_c
        cover_a += (data.attacked[:, i] > t) & ~old_a
        pos[i], thr[i] = j, t


def _scaled(data: _Data, weights: tuple[float, ...], allowed_total: int) -> list[float | None]:
    """Thresholds at clean counts proportional to ``weights``, scaled up as far as the union
    budget allows (bisection on the scale)."""

    def at(scale: float) -> list[float | None]:
        return [data.threshold(i, int(np.floor(scale * w)) - 1) if w > 0 else None
                for i, w in enumerate(weights)]

    lo, hi = 0.0, float(data.n) / max(min(w for w in weights if w > 0), 1e-12) + 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if data.union(at(mid))[0] <= allowed_total:
            lo = mid
        else:
            hi = mid
    return at(lo)


def allocate(clean: Mapping[Check, ArrayLike], attacked: Mapping[Check, ArrayLike],
             total_rate: float, *,
             floors: Mapping[Check, float | None] | None = None,
             weights: ArrayLike | None = None) -> Allocation:
    """Per-check thresholds holding the union clean rate within ``total_rate``.

    clean: per check float [N] scores of clean calibration images (same images, same order
    in every array); attacked: per check float [M] scores of attacked reference images.
    floors: lowest threshold allowed per check (reject thresholds use the flag ones, so a
    REJECT always implies a FLAG); a floor of None keeps that check at None (never).
    weights: float [M] >= 0 per attacked image (None: all equal); the detection rate
    maximised and reported is the weighted share caught.
    """
    if not 0.0 <= total_rate <= 1.0:
        raise CalibrationError(f"total_rate must be in [0, 1], got {total_rate}")
    data = _Data(clean, attacked, floors or {}, weights)
    allowed = int(np.floor(total_rate * data.n + 1e-9))
    k = len(data.checks)
    candidates: list[tuple[str, list[float | None]]] = [
        ("greedy", _greedy(data, allowed)),
        ("equal", _scaled(data, (1.0,) * k, allowed))]
    for i, c in enumerate(data.checks):
        candidates.append((f"alone:{c.value}", _scaled(
            data, tuple(1.0 if m == i else 0.0 for m in range(k)), allowed)))
    if 1 < k <= 3:
        steps = 20
        for parts in itertools.product(range(steps + 1), repeat=k):
            if sum(parts) == steps and max(parts) < steps:
                w = tuple(p / steps for p in parts)
                candidates.append(("grid:" + ",".join(f"{x:.2f}" for x in w),
                                   _scaled(data, w, allowed)))
    best_key: tuple[float, int] | None = None
    best: tuple[str, list[float | None]] = candidates[0]
    for name, thr in candidates:
        n_clean, detected = data.union(thr)
        if n_clean > allowed:
            continue
        key = (detected, n_clean)
        if best_key is None or key > best_key:
            best_key, best = key, (name, thr)
    name, thr = best
    n_clean, detected = data.union(thr)
    rates = {c: float(np.mean(data.clean[:, i] > t)) if t is not None else 0.0
             for i, (c, t) in enumerate(zip(data.checks, thr))}
    return Allocation(thresholds=dict(zip(data.checks, thr)), clean_rate=n_clean / data.n,
                      detection_rate=detected, rates=rates, method=name)
