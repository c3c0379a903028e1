"""The gate's checks as pure functions of probe outputs. Higher score = more suspicious.

Each function takes softmax probabilities (float64, rows sum to 1) of the base image and of
the relevant variants (:func:`softmax` turns the handler's logits into them), except squeeze,
which reads the logits themselves.

| check     | raw score                                              | range   |
|-----------|--------------------------------------------------------|---------|
| squeeze   | L2(base, squeezed) of centred logits, per squeezer     | [0, inf)|
| viewpoint | mean over views of L1(base, view)                      | [0, 2]  |
| density   | Mahalanobis distance to the predicted class (density)  | [0, inf)|
| occlusion | largest drop of the base top-1 probability             | [-1, 1] |
| structure | mean base-top-1 probability over shuffled copies       | [0, 1]  |
| noise     | share of noisy copies that lose the base top-1         | [0, 1]  |
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from numpy.typing import ArrayLike, NDArray


class Check(StrEnum):
    """Names of the checks, as they appear in policies, reports and metric labels."""

    SQUEEZE = "squeeze"
    VIEWPOINT = "viewpoint"
    DENSITY = "density"
    OCCLUSION = "occlusion"
    STRUCTURE = "structure"
    NOISE = "noise"


#: Checks scored from the first probe call (one batched forward, plus features).
CHEAP_CHECKS: tuple[Check, ...] = (Check.SQUEEZE, Check.VIEWPOINT, Check.DENSITY,
                                   Check.OCCLUSION, Check.STRUCTURE)


def softmax(logits: ArrayLike) -> NDArray[np.float64]:
    """Row-wise softmax in float64: logits float [..., C] -> probabilities [..., C]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float64)


def _rows(probs: ArrayLike, classes: int, name: str) -> NDArray[np.float64]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != classes:
        raise ValueError(f"{name} must be [K, {classes}], got shape {p.shape}")
    return p


def l1_distances(base: ArrayLike, variants: ArrayLike) -> NDArray[np.float64]:
    """L1 distance between the base softmax (float [C]) and each variant's (float [K, C]);
    returns float64 [K] in [0, 2]."""
    b = np.asarray(base, dtype=np.float64)
    v = _rows(variants, b.shape[-1], "variants")
    return np.asarray(np.abs(v - b).sum(axis=1), dtype=np.float64)


def centred_moves(base: ArrayLike, variants: ArrayLike) -> NDArray[np.float64]:
    """Each variant's logits (float [K, C]) minus the base's (float [C]), each row centred
    (logits are defined up to a shift); returns float64 [K, C]."""
    b = np.asarray(base, dtype=np.float64)
    d = _rows(variants, b.shape[-1], "variants") - b
    d -= d.sum(axis=1, keepdims=True) / d.shape[1]  # the row means, as .mean() computes them, faster
    return d


def logit_distances(base: ArrayLike, variants: ArrayLike) -> NDArray[np.float64]:
    """L2 distance between the base logits (float [C]) and each variant's (float [K, C]):
    the length of each :func:`centred_moves` row; returns float64 [K] >= 0."""
    return np.linalg.norm(centred_moves(base, variants), axis=1)


def squeeze_scores(base: ArrayLike, squeezed: ArrayLike) -> NDArray[np.float64]:
    """Feature squeezing (Xu, Evans, Qi, NDSS 2018), measured on logits: one score per
    squeezer.

    base: float [C] logits of the base image; squeezed: float [S, C] logits of each squeezed
    copy in plan order. Returns float64 [S], :func:`logit_distances`. The check's score
    combines them: through the calibration-fitted detector
    (:mod:`service.gate.squeeze_detector`), else as the maximum of each score's clean quantile
    (:func:`service.gate.quantile.max_quantile`).

    The paper compares softmax outputs (L1). Softmax saturates: an attack that ends in a
    confident wrong answer keeps it after squeezing, so the softmax barely moves while the
    logits do. Measured on fmnist-cnn (in process, bit depths 2, 3, 4, at a 5 % clean flag
    rate), the logit distance caught 75-95 % of successful FGSM/PGD at eps 0.03 and 0.1
    against 46-84 % for softmax L1.
    """
    return logit_distances(base, squeezed)


def viewpoint_score(base: ArrayLike, views: ArrayLike) -> float:
    """Mean L1 between the base softmax (float [C]) and each view's (float [K, C], K >= 1)."""
    d = l1_distances(base, views)
    if d.size == 0:
        raise ValueError("viewpoint_score needs at least one view")
    return float(d.sum() / d.size)  # .mean()'s value, faster


def occlusion_score(base: ArrayLike, occluded: ArrayLike) -> float:
    """Largest drop of the base top-1 probability over occluded copies.

    base: float [C]; occluded: float [G*G, C]. Returns ``max_w p_base[c] - p_w[c]`` with
    ``c`` the base top-1; negative when every window raises it.
    """
    b = np.asarray(base, dtype=np.float64)
    o = _rows(occluded, b.shape[-1], "occluded")
    if o.shape[0] == 0:
        raise ValueError("occlusion_score needs at least one occluded copy")
    c = int(np.argmax(b))
    return float(np.max(b[c] - o[:, c]))


def structure_score(base: ArrayLike, shuffled: ArrayLike) -> float:
    """Mean probability of the base top-1 class over tile-shuffled copies.

    base: float [C]; shuffled: float [K, C]. High = the model keeps its answer when the parts
    are rearranged, i.e. it ignores their arrangement.
    """
    b = np.asarray(base, dtype=np.float64)
    s = _rows(shuffled, b.shape[-1], "shuffled")
    if s.shape[0] == 0:
        raise ValueError("structure_score needs at least one shuffled copy")
    return float(s[:, int(np.argmax(b))].mean())
