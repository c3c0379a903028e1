"""Feature density: Mahalanobis distance to the predicted class (Lee et al., NeurIPS 2018).

Class means and one shared (tied) covariance are fitted on penultimate-layer features of the
calibration split; the score of an image is the Mahalanobis distance of its base features to
the mean of its predicted class. Far from every class mean = out of distribution, or an
attack that pushed the logits into a class without making the features look like it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.gate.errors import CalibrationError


@dataclass(frozen=True, eq=False)
class DensityModel:
    """means: float64 [C, D] class means; precision: float64 [D, D] inverse of the shrunk
    shared covariance (symmetric positive definite)."""

    means: NDArray[np.float64]
    precision: NDArray[np.float64]

    def __post_init__(self) -> None:
        m = np.array(self.means, dtype=np.float64)
        p = np.array(self.precision, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
            raise CalibrationError(f"density means must be [C, D], got {m.shape}")
        if p.shape != (m.shape[1], m.shape[1]):
            raise CalibrationError(f"density precision must be [{m.shape[1]}, {m.shape[1]}], "
                                   f"got {p.shape}")
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(p))):
            raise CalibrationError("density model has non-finite values")
        if not np.allclose(p, p.T, rtol=1e-6, atol=1e-9):
            raise CalibrationError("density precision must be symmetric")
        try:  # else a distance can be 0, or negative under the root, for features far from every mean
            np.linalg.cholesky(p)
        except np.linalg.LinAlgError:
            raise CalibrationError("density precision must be positive definite") from None
        for a in (m, p):
            a.setflags(write=False)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "precision", p)

    @property
    def classes(self) -> int:
        """C, the number of classes."""
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        """D, the feature dimension."""
        return int(self.means.shape[1])

    def distance(self, features: ArrayLike, label: int) -> float:
        """Mahalanobis distance of features (float [D]) to class ``label``'s mean, >= 0."""
        f = np.asarray(features, dtype=np.float64)
        if f.shape != (self.dim,):
            raise ValueError(f"features must be [{self.dim}], got {f.shape}")
        if not 0 <= label < self.classes:
            raise ValueError(f"label {label} outside 0..{self.classes - 1}")
        d = f - self.means[label]
        return float(np.sqrt(max(float(d @ self.precision @ d), 0.0)))

    def distances(self, features: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
        """Batch form: features float [N, D], labels int [N] -> float64 [N]."""
        f = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        if f.ndim != 2 or f.shape[1] != self.dim or y.shape != (f.shape[0],):
            raise ValueError(f"features must be [N, {self.dim}] and labels [N], got {f.shape} and {y.shape}")
        if y.size and not (0 <= y.min() and y.max() < self.classes):  # -1 would read the last class
            raise ValueError(f"labels outside 0..{self.classes - 1}")
        d = f - self.means[y]
        q = np.einsum("nd,de,ne->n", d, self.precision, d)
        return np.asarray(np.sqrt(np.maximum(q, 0.0)), dtype=np.float64)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DensityModel) and np.array_equal(self.means, other.means)
                and np.array_equal(self.precision, other.precision))

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"means": [[...]], "precision": [[...]]}`` (no pickle)."""
        return {"means": self.means.tolist(), "precision": self.precision.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DensityModel:
        """Inverse of :meth:`to_dict`; raises CalibrationError on bad content."""
        if not isinstance(data, Mapping) or set(data) != {"means", "precision"}:
            raise CalibrationError("density model: expected exactly 'means' and 'precision'")
        try:
            return cls(np.asarray(data["means"], dtype=np.float64),
                       np.asarray(data["precision"], dtype=np.float64))
        except (TypeError, ValueError, OverflowError) as exc:  # overflow: an integer beyond any float
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"density model: {exc}") from exc


def fit_density(features: ArrayLike, labels: ArrayLike, num_classes: int | None = None, *,
                shrinkage: float = 0.01) -> DensityModel:
    """Fit class means and a shared covariance.

    features: float [N, D] penultimate features of clean calibration images; labels: int [N]
    true classes in 0..C-1 (every class needs at least one image). The covariance is the
    pooled within-class covariance ``S`` (divided by N), shrunk towards a scaled identity for
    stability: ``(1 - shrinkage) * S + shrinkage * (trace(S) / D) * I`` plus a tiny ridge.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.shape != (f.shape[0],) or f.shape[0] < 2:
        raise CalibrationError(f"need features [N, D] and labels [N], N >= 2; got {f.shape}, "
                               f"{y.shape}")
    if not np.all(np.isfinite(f)):
        raise CalibrationError("features contain non-finite values")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise CalibrationError("labels must be non-negative integers")
    if not 0.0 <= shrinkage <= 1.0:
        raise CalibrationError(f"shrinkage must be in [0, 1], got {shrinkage}")
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    counts = np.bincount(y, minlength=c)
    if counts.size > c or np.any(counts == 0):
        raise CalibrationError(f"every class in 0..{c - 1} needs at least one image, and no "
                               f"label may exceed it; counts {counts.tolist()}")
    means = np.zeros((c, f.shape[1]))
    np.add.at(means, y, f)
    means /= counts[:, None]
    centred = f - means[y]
    cov = centred.T @ centred / f.shape[0]
    dim = f.shape[1]
    scale = float(np.trace(cov)) / dim
    ridge = 1e-9 * max(scale, 1e-12)
    shrunk = (1.0 - shrinkage) * cov + (shrinkage * scale + ridge) * np.eye(dim)
    precision = np.linalg.inv(shrunk)
    return DensityModel(means=means, precision=(precision + precision.T) / 2.0)
