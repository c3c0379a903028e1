"""A fitted linear detector over the squeeze check's measurements.

Feature squeezing (Xu, Evans, Qi, NDSS 2018) flags an image when squeezing moves the model's
output more than it moves a clean image's. The paper takes the maximum over squeezers; each
squeezer's distance alone throws away two things the same forward passes already measured:

- whether the move takes logit mass away from the predicted class (an attack sits just past
  a decision boundary, and squeezing undoes part of the step, so the predicted logit drops),
  as opposed to a large move that keeps the answer (clean images with texture);
- how confident the base answer is: a given move matters more when the base margin is thin.

The detector reads, per squeezer, ``log(L2 + 1e-3)`` of the centred logits and the centred
drop of the predicted logit, plus ``log(margin + 1e-3)`` of the base logits (``2 S + 1``
features, plus 4 of context and 3 of jitter when it reads them, below). It is fitted at
calibration on clean reference images against the reference attacks (FGSM and PGD that
succeeded), with ridge regularisation, and its decision value is mapped through its clean
CDF, so the squeeze check's score stays a clean quantile in [0, 1] and its thresholds keep
their meaning.

**Form**: calibration fits one hidden layer of 32 tanh units before the logistic output
(:data:`DEFAULT_HIDDEN`; a few hundred numbers in the policy, evaluated with two small
matrix products per request). A logistic regression, whose weights read one per feature,
stays available (``python -m service.calibration --detector-hidden 0``) and older policies
hold one. The layer is worth its opacity because the features interact (the measured gain,
below, is what a line through them misses); it is fitted by L-BFGS from a seeded start, so
a calibration is reproducible on one machine.

**Context** (:data:`CONTEXT_FEATURES`): the same cheap probe also holds the views and the
base image's penultimate features, and the detector may read them too: the log Mahalanobis
distance to the predicted class (the density check's score; Lee et al., NeurIPS 2018, fit a
logistic regression over such distances against attacks), the log of the viewpoint check's
mean L1, and the views' mean log centred-logit L2 and mean top-1 drop, measured as for the
squeezers (an attack's step is brittle to small shifts and rotations as well as to
squeezing; Luo et al. 2015, Tian et al. 2018). No extra forward pass: the four are measured
on rows the cheap probe already runs, and a policy whose detector reads them sends the views
and asks for features even where the viewpoint or density check is off.

**Jitter** (:data:`JITTER_FEATURES`): a detector may also read a few copies of the base
image with small Gaussian noise added (the probe's jitter section; sigma 0.03 in [0, 1]
pixel units, about 8 grey levels, and 4 copies by default), measured as the squeezers are:
the copies' mean log centred-logit L2, their mean top-1 drop and the share of them keeping
the top-1. A successful small-eps attack sits just past a decision boundary where the
logits are steep, so noise far too small to undo the attack still moves its logits more
than a clean image's (the statistic of Roth, Kilcher, Hofmann, ICML 2019, "The odds are
odd", read here as detector features). Four copies cost four forward passes.

Measured in process on fmnist-cnn (``python -m benchmarks.detector_study``: the
calibration's own fit and allocation, attacks made from 4,000 test images the fit never
saw; build of 2026-12-04), share of successful FGSM 0.03 / FGSM 0.1 / PGD 0.03 / PGD 0.1
the whole cheap gate flags: 69.3 / 76.2 / 86.9 / 81.5 % without context, 70.2 / 76.4 /
91.0 / 90.3 % with it, 84.8 / 93.6 / 95.8 / 95.4 % with the jitter too and 87.6 / 94.3 /
96.4 / 98.3 % with the hidden layer as well, at 4.9-5.2 % of clean test images; rotated
and tile-shuffled images stay at 93-94 / 86-88 % throughout. With the whole budget on
squeeze, FGSM 0.03 reaches 79.3 % without context, 84.8 % with it, 90.6 % with the jitter
and 93.4 % with the hidden layer, and the shifted sets fall to 4-24 %: they need their
share of the budget.
A detector fitted on FGSM and PGD is, like every fitted detector, at its best on those; the
robustness report measures it on CW and corruptions it never saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.gate.allocation import attack_weights
from service.gate.checks import centred_moves
from service.gate.errors import CalibrationError
from service.gate.quantile import EmpiricalCDF

_EPS = 1e-3
#: Ridge penalty on the standardised weights; total sample weight is 1 (half clean, half
#: attacked), so this is a light pull towards zero that keeps separable data finite.
DEFAULT_RIDGE = 1e-3
#: Hidden tanh units of the detector calibration fits (0 fits a logistic regression).
DEFAULT_HIDDEN = 32
#: Fewer successful reference attacks than this: no detector (max-quantile is used).
MIN_ATTACKS = 20
#: What a detector with context reads after the squeeze features, in this order.
CONTEXT_FEATURES: tuple[str, ...] = ("log_density", "log_viewpoint_l1", "log_view_l2",
                                     "view_top_drop")
#: What a detector that also reads jitter reads after the context, in this order.
JITTER_FEATURES: tuple[str, ...] = ("log_jitter_l2", "jitter_top_drop", "jitter_keep")
#: The contexts a detector may read: none, the views and density, or those and the jitter.
CONTEXTS: tuple[tuple[str, ...], ...] = ((), CONTEXT_FEATURES, CONTEXT_FEATURES + JITTER_FEATURES)


@dataclass(frozen=True, eq=False)
class SqueezeMeasurement:
    """What the squeeze check measures on one image, the detector's raw material.

    l2: float64 [S] centred-logit L2 per squeezer (:func:`service.gate.checks.squeeze_scores`);
    top_drop: float64 [S] centred drop of the base top-1 logit per squeezer; margin: top-1
    minus top-2 logit of the base.
    """

    l2: NDArray[np.float64]
    top_drop: NDArray[np.float64]
    margin: float

    def features(self) -> NDArray[np.float64]:
        """The detector's features, float64 [2 S + 1]: ``log(L2 + 1e-3)`` per squeezer, the
        top-1 drop per squeezer, then ``log(margin + 1e-3)``."""
        return np.concatenate([np.log(self.l2 + _EPS), self.top_drop,
                               [np.log(self.margin + _EPS)]])


def _mean(a: NDArray) -> float:
    """``a.mean()``'s value (the float64 sum over the count) without its per-call overhead:
    the gateway takes several of a few numbers for every gated request."""
    return a.sum() / a.size


@dataclass(frozen=True, eq=False)
class Moves:
    """How each variant's logits move from the base's, measured once for all of a probe's
    variant rows: the squeezers, the views and the jitter copies are each read from the same
    arrays (:meth:`squeeze`, :meth:`context`, :meth:`jitter` take a section's rows), so the
    gateway's per-request arithmetic is one pass over the probe, not one per section.

    l2: float64 [K] centred-logit L2 per variant (:func:`service.gate.checks.squeeze_scores`);
    top_drop: float64 [K] centred drop of the base top-1 logit; keep: bool [K], the variant's
    top-1 is the base's; margin: top-1 minus top-2 logit of the base.
    """

    l2: NDArray[np.float64]
    top_drop: NDArray[np.float64]
    keep: NDArray[np.bool_]
    margin: float

    @classmethod
    def measure(cls, base_logits: ArrayLike, variant_logits: ArrayLike) -> Moves:
        """Base float [C] logits, variants float [K, C]."""
        b = np.asarray(base_logits, dtype=np.float64)
        v = np.asarray(variant_logits, dtype=np.float64)
        if b.ndim != 1 or b.size < 2 or v.ndim != 2 or v.shape[1] != b.size or v.shape[0] < 1:
            raise ValueError(f"need base [C >= 2] and variant [K >= 1, C] logits, got "
                             f"{b.shape}, {v.shape}")
        top = int(np.argmax(b))
        d = centred_moves(b, v)  # computed once: l2 is squeeze_scores(b, v), their length
        top2 = np.sort(b)[-2:]
        return cls(l2=np.sqrt((d * d).sum(axis=1)), top_drop=-d[:, top],  # np.linalg.norm's sum, without its checks
                   keep=np.argmax(v, axis=1) == top, margin=float(top2[1] - top2[0]))

    def squeeze(self, rows: slice = slice(None)) -> SqueezeMeasurement:
        """The squeezers' measurement, ``rows`` the squeezed copies."""
        return SqueezeMeasurement(l2=self.l2[rows], top_drop=self.top_drop[rows],
                                  margin=self.margin)

    def context(self, rows: slice, viewpoint_l1: float, density: float) -> NDArray[np.float64]:
        """The :data:`CONTEXT_FEATURES`, float64 [4], ``rows`` the views (each measured as a
        squeezer is), with the viewpoint check's mean L1 and the density check's distance."""
        return np.array([np.log(density + _EPS), np.log(viewpoint_l1 + _EPS),
                         _mean(np.log(self.l2[rows] + _EPS)), _mean(self.top_drop[rows])])

    def jitter(self, rows: slice = slice(None)) -> NDArray[np.float64]:
        """The :data:`JITTER_FEATURES`, float64 [3], ``rows`` the jittered copies (each
        measured as a squeezer is)."""
        return np.array([_mean(np.log(self.l2[rows] + _EPS)), _mean(self.top_drop[rows]),
                         _mean(self.keep[rows])])


def measure_squeeze(base_logits: ArrayLike, squeezed_logits: ArrayLike) -> SqueezeMeasurement:
    """Measure one image: base float [C] logits, squeezed float [S, C] in plan order."""
    return Moves.measure(base_logits, squeezed_logits).squeeze()


def squeeze_features(base_logits: ArrayLike, squeezed_logits: ArrayLike) -> NDArray[np.float64]:
    """The detector's features of one image (:meth:`SqueezeMeasurement.features`)."""
    return measure_squeeze(base_logits, squeezed_logits).features()


def context_features(base_logits: ArrayLike, view_logits: ArrayLike, viewpoint_l1: float,
                     density: float) -> NDArray[np.float64]:
    """The :data:`CONTEXT_FEATURES` of one image, float64 [4]: base float [C] and views
    float [V, C] logits, the viewpoint check's mean L1 and the density check's distance."""
    return Moves.measure(base_logits, view_logits).context(slice(None), viewpoint_l1, density)


def jitter_features(base_logits: ArrayLike, jitter_logits: ArrayLike) -> NDArray[np.float64]:
    """The :data:`JITTER_FEATURES` of one image, float64 [3]: base float [C] and jittered
    copies' float [J, C] logits."""
    return Moves.measure(base_logits, jitter_logits).jitter()


@dataclass(frozen=True, eq=False)
class SqueezeDetector:
    """A classifier on standardised squeeze features, with the clean CDF of its decision
    values: a logistic regression, or with ``hidden_weights`` one hidden layer of tanh units
    before the logistic output.

    mean, scale: float64 [F]; weights: float64 [F] (logistic) or [H] (hidden layer); bias:
    float; clean: EmpiricalCDF; context: one of :data:`CONTEXTS`, the features read after the
    ``2 S + 1`` squeeze ones (``F = 2 S + 1 + len(context)``); views: how many views the
    context was measured on (0 without context): three of its features average over them;
    jitter: the jitter copies (count, sigma) its jitter features were measured on ((0, 0.0)
    without); hidden_weights float64 [H, F] and hidden_bias [H], both None for a logistic
    regression."""

    mean: NDArray[np.float64]
    scale: NDArray[np.float64]
    weights: NDArray[np.float64]
    bias: float
    clean: EmpiricalCDF
    context: tuple[str, ...] = ()
    views: int = 0
    jitter: tuple[int, float] = (0, 0.0)
    hidden_weights: NDArray[np.float64] | None = None
    hidden_bias: NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        arrays = [np.array(a, dtype=np.float64) for a in (self.mean, self.scale, self.weights)]
        if any(a.ndim != 1 for a in arrays) or arrays[0].size != arrays[1].size or arrays[0].size < 3:
            raise CalibrationError("squeeze detector: mean and scale must be 1-D of one "
                                   "length >= 3")
        if (self.hidden_weights is None) != (self.hidden_bias is None):
            raise CalibrationError("squeeze detector: hidden_weights and hidden_bias come together")
        hidden: list[np.ndarray] = []
        if self.hidden_weights is not None:
            hidden = [np.array(self.hidden_weights, dtype=np.float64),
                      np.array(self.hidden_bias, dtype=np.float64)]
            h = hidden[1].size
            if hidden[0].shape != (h, arrays[0].size) or hidden[1].shape != (h,) or h < 1 \
                    or arrays[2].shape != (h,):
                raise CalibrationError(f"squeeze detector: a hidden layer needs hidden_weights "
                                       f"[H, {arrays[0].size}], hidden_bias [H] and weights [H], "
                                       f"H >= 1")
        elif arrays[2].size != arrays[0].size:
            raise CalibrationError("squeeze detector: mean, scale and weights must be 1-D of one "
                                   "length >= 3")
        if not all(np.all(np.isfinite(a)) for a in arrays + hidden) or not np.isfinite(self.bias):
            raise CalibrationError("squeeze detector has non-finite values")
        if np.any(arrays[1] <= 0):
            raise CalibrationError("squeeze detector: scale must be > 0")
        if not isinstance(self.clean, EmpiricalCDF):
            raise CalibrationError("squeeze detector: clean must be an EmpiricalCDF")
        context = tuple(self.context)
        if context not in CONTEXTS:
            raise CalibrationError(f"squeeze detector: context must be one of "
                                   f"{[list(c) for c in CONTEXTS]}, got {list(context)}")
        own = arrays[0].size - len(context)
        if own < 3 or own % 2 == 0:
            raise CalibrationError(f"squeeze detector: {arrays[0].size} weights do not fit "
                                   f"2 S + 1 squeeze features plus {len(context)} of context")
        if isinstance(self.views, bool) or not isinstance(self.views, int) \
                or (self.views < 1 if context else self.views != 0):
            raise CalibrationError("squeeze detector: views must be the number of views (>= 1) "
                                   "its context was measured on, and 0 without context")
        try:
            count, sigma = self.jitter
        except (TypeError, ValueError):
            raise CalibrationError("squeeze detector: jitter must be [count, sigma]") from None
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) \
                or isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating)):
            raise CalibrationError("squeeze detector: jitter must be [count, sigma]: an integer "
                                   "and a number")
        count, sigma = int(count), float(sigma)
        reads_jitter = context == CONTEXTS[2]
        if not (count >= 1 and 0.0 < sigma <= 1.0 if reads_jitter else (count, sigma) == (0, 0.0)):
            raise CalibrationError("squeeze detector: jitter must be the copies (>= 1) and sigma "
                                   "(0, 1] its jitter features were measured on, and [0, 0] "
                                   "without them")
        object.__setattr__(self, "jitter", (count, sigma))
        object.__setattr__(self, "context", context)
        for name, a in zip(("mean", "scale", "weights", "hidden_weights", "hidden_bias"),
                           arrays + hidden):
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        object.__setattr__(self, "bias", float(self.bias))

    @property
    def hidden(self) -> int:
        """H, the hidden units (0: a logistic regression)."""
        return 0 if self.hidden_bias is None else int(self.hidden_bias.size)

    @property
    def reads_jitter(self) -> bool:
        """Does it read :data:`JITTER_FEATURES` (and so need the probe's jitter copies)?"""
        return self.jitter[0] > 0

    def jitter_matches(self, count: int, sigma: float) -> bool:
        """Are ``count`` copies at ``sigma`` the jitter this detector was fitted on? Sigma is
        compared at float32, the precision the plan carries to the handler."""
        return count == self.jitter[0] and np.float32(sigma) == np.float32(self.jitter[1])

    @property
    def squeezers(self) -> int:
        """S, the number of squeezers the features come from."""
        return (int(self.mean.size) - len(self.context) - 1) // 2

    def decision(self, features: ArrayLike) -> NDArray[np.float64]:
        """Log-odds of 'attacked' for features float [..., F]; float64 [...]."""
        f = np.asarray(features, dtype=np.float64)
        if f.shape[-1:] != self.mean.shape:
            raise ValueError(f"features must be [..., {self.mean.size}], got {f.shape}")
        z = (f - self.mean) / self.scale
        if self.hidden_weights is not None:
            z = np.tanh(z @ self.hidden_weights.T + self.hidden_bias)
        return np.asarray(z @ self.weights + self.bias, dtype=np.float64)

    def score(self, features: ArrayLike) -> float:
        """The squeeze check's score of one image: the clean quantile of its decision value."""
        return self.clean.at(float(self.decision(features)))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SqueezeDetector) and self.bias == other.bias
                and self.clean == other.clean and self.context == other.context
                and self.views == other.views and self.jitter == other.jitter
                and self.hidden == other.hidden
                and all(np.array_equal(getattr(self, k), getattr(other, k))
                        for k in ("mean", "scale", "weights", "hidden_weights", "hidden_bias")))

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (no pickle): mean, scale, weights, bias, the clean CDF's values, and the
        context's names and view count (left out without context, as in policies written
        before it), jitter [count, sigma] (left out without jitter, likewise) and the hidden
        layer {"weights": [H][F], "bias": [H]} (left out for a logistic regression)."""
        out: dict[str, Any] = {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                               "weights": self.weights.tolist(), "bias": self.bias,
                               "clean": self.clean.to_dict()}
        if self.context:
            out["context"] = list(self.context)
            out["views"] = self.views
        if self.reads_jitter:
            out["jitter"] = list(self.jitter)
        if self.hidden_weights is not None and self.hidden_bias is not None:
            out["hidden"] = {"weights": self.hidden_weights.tolist(),
                             "bias": self.hidden_bias.tolist()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SqueezeDetector:
        """Inverse of :meth:`to_dict`; raises CalibrationError on bad content."""
        keys = {"mean", "scale", "weights", "bias", "clean"}
        optional = {"context", "views", "jitter", "hidden"}
        if not isinstance(data, Mapping) or not keys <= set(data) <= keys | optional:
            raise CalibrationError(f"squeeze detector: expected {sorted(keys)} and optionally "
                                   "'context', 'views', 'jitter' and 'hidden'")
        context = data.get("context", [])
        if not isinstance(context, list) or not all(isinstance(c, str) for c in context):
            raise CalibrationError("squeeze detector: context must be a list of names")
        if isinstance(data["bias"], bool) or not isinstance(data["bias"], (int, float)):
            raise CalibrationError("squeeze detector: bias must be a number")
        try:
            bias = float(data["bias"])
            arrays = [np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "weights")]
        except (TypeError, ValueError, OverflowError) as exc:  # overflow: an integer beyond any float
            raise CalibrationError(f"squeeze detector: {exc}") from exc
        jitter = data.get("jitter", [0, 0.0])
        if not isinstance(jitter, list) or len(jitter) != 2:
            raise CalibrationError("squeeze detector: jitter must be [count, sigma]")
        hidden: list[np.ndarray | None] = [None, None]
        if "hidden" in data:
            layer = data["hidden"]
            if not isinstance(layer, Mapping) or set(layer) != {"weights", "bias"}:
                raise CalibrationError("squeeze detector: hidden must be {'weights', 'bias'}")
            try:
                hidden = [np.asarray(layer[k], dtype=np.float64) for k in ("weights", "bias")]
            except (TypeError, ValueError, OverflowError) as exc:
                raise CalibrationError(f"squeeze detector: hidden: {exc}") from exc
        return cls(*arrays, bias=bias, clean=EmpiricalCDF.from_dict(data["clean"]),
                   context=tuple(context), views=data.get("views", 0), jitter=tuple(jitter),
                   hidden_weights=hidden[0], hidden_bias=hidden[1])


def fit_squeeze_detector(clean: ArrayLike, attacked: ArrayLike, weights: ArrayLike | None = None,
                         *, ridge: float = DEFAULT_RIDGE, max_points: int | None = 4096,
                         iterations: int = 50, context: tuple[str, ...] = (),
                         views: int = 0, jitter: tuple[int, float] = (0, 0.0),
                         hidden: int = 0, seed: int = 0) -> SqueezeDetector:
    """Fit the detector: clean float [N, F] and attacked float [M, F] features (the squeeze
    features, then the ``context`` ones: one of :data:`CONTEXTS`, measured on ``views`` views
    and the ``jitter`` copies (count, sigma)).

    weights: float [M] per attacked image (None: equal), normalised so attacked and clean
    images each carry half the total weight. hidden 0: a logistic regression, by Newton's
    method on the ridge-penalised log-likelihood (deterministic; the problem is convex).
    hidden H > 0: one layer of H tanh units before the logistic output, fitted by L-BFGS on
    the same weighted, ridge-penalised log-likelihood from a start drawn with ``seed``
    (deterministic for a seed; the problem is not convex, so another seed finds another
    local optimum). The clean CDF is taken over the clean images' decision values.
    """
    c = np.asarray(clean, dtype=np.float64)
    a = np.asarray(attacked, dtype=np.float64)
    if c.ndim != 2 or a.ndim != 2 or c.shape[1] != a.shape[1] or c.shape[1] < 3:
        raise CalibrationError(f"need clean [N, F] and attacked [M, F] features (F >= 3), got "
                               f"{c.shape}, {a.shape}")
    if c.shape[0] < 2 or a.shape[0] < 1:
        raise CalibrationError("need at least 2 clean and 1 attacked images")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(a))):
        raise CalibrationError("features contain non-finite values")
    w_att = attack_weights(weights, a.shape[0])
    if not ridge > 0:
        raise CalibrationError(f"ridge must be > 0, got {ridge}")
    mean = c.mean(axis=0)
    scale = c.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    x = np.vstack([c, a])
    z = np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))])
    y = np.r_[np.zeros(c.shape[0]), np.ones(a.shape[0])]
    w = np.r_[np.full(c.shape[0], 0.5 / c.shape[0]), 0.5 * w_att]
    penalty = ridge * np.r_[np.ones(z.shape[1] - 1), 0.0]
    theta = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ theta, -50, 50)))
        grad = z.T @ (w * (p - y)) + penalty * theta
        hess = (z * (w * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-12)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise CalibrationError(f"hidden must be an integer >= 0, got {hidden!r}")
    if not hidden:
        clean_decisions = z[:c.shape[0]] @ theta  # the first rows of z are the clean images
        return SqueezeDetector(mean=mean, scale=scale, weights=theta[:-1], bias=float(theta[-1]),
                               clean=EmpiricalCDF.from_samples(clean_decisions, max_points),
                               context=tuple(context), views=views, jitter=jitter)
    w1, b1, w2, b2 = _fit_hidden(z[:, :-1], y, w, ridge, hidden, seed)
    clean_decisions = np.tanh(z[:c.shape[0], :-1] @ w1.T + b1) @ w2 + b2
    return SqueezeDetector(mean=mean, scale=scale, weights=w2, bias=b2,
                           clean=EmpiricalCDF.from_samples(clean_decisions, max_points),
                           context=tuple(context), views=views, jitter=jitter,
                           hidden_weights=w1, hidden_bias=b1)


def _fit_hidden(z: NDArray[np.float64], y: NDArray[np.float64], w: NDArray[np.float64],
                ridge: float, hidden: int, seed: int
                ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float]:
    """One tanh layer and a logistic output on standardised features z [R, F], labels y [R]
    and sample weights w [R] (summing to 1): minimise sum(w * log-loss) + ridge * (|W1|^2 +
    |w2|^2) by L-BFGS with analytic gradients. Returns W1 [H, F], b1 [H], w2 [H], b2."""
    from scipy.optimize import minimize  # calibration only; the gateway just evaluates

    rows, f = z.shape
    rng = np.random.default_rng(seed)
    start = np.concatenate([rng.normal(0.0, 1.0 / np.sqrt(f), hidden * f), np.zeros(hidden),
                            rng.normal(0.0, 1.0 / np.sqrt(hidden), hidden), [0.0]])

    def unpack(p: NDArray[np.float64]):
        return (p[:hidden * f].reshape(hidden, f), p[hidden * f:hidden * (f + 1)],
                p[hidden * (f + 1):-1], p[-1])

    def loss(p: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
        w1, b1, w2, b2 = unpack(p)
        h = np.tanh(z @ w1.T + b1)
        s = h @ w2 + b2
        value = float(w @ (np.logaddexp(0.0, s) - y * s) + ridge * (np.sum(w1 * w1) + w2 @ w2))
        r = w * (1.0 / (1.0 + np.exp(-np.clip(s, -50, 50))) - y)
        da = (r[:, None] * w2[None, :]) * (1.0 - h * h)
        grad = np.concatenate([(da.T @ z + 2 * ridge * w1).ravel(), da.sum(axis=0),
                               h.T @ r + 2 * ridge * w2, [r.sum()]])
        return value, grad

    result = minimize(loss, start, jac=True, method="L-BFGS-B",
                      options={"maxiter": 3000, "maxfun": 6000, "ftol": 1e-12, "gtol": 1e-8})
    w1, b1, w2, b2 = unpack(np.asarray(result.x, dtype=np.float64))
    return w1, b1, w2, float(b2)
