"""Scoring: from the handler's logits (and features) to check scores and a report.

Pure and deterministic: the same logits, plan and policy always give the same report.
``score`` handles one probe result holding every section it needs; the cascade (cheap
stage, then sequential noise batches) is driven by :class:`service.gate.cascade.GateRun`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.gate.checks import (
    Check, occlusion_score, softmax, structure_score, viewpoint_score,
)
from service.gate.density import DensityModel
from service.gate.errors import ScoreInputError
from service.gate.plan import ProbeSpec
from service.gate.policy import Policy, References
from service.gate.quantile import max_quantile
from service.gate.report import CheckScore, GateReport, decide
from service.gate.sequential import disagreement_share
from service.gate.smoothing import certify_counts, count_agreements
from service.gate.squeeze_detector import CONTEXT_FEATURES, Moves


@dataclass(frozen=True)
class RawScores:
    """Raw measurements from one probe result (None where the plan had no such section).

    top_class: base top-1. squeeze: logit L2 per squeezer, plan order; squeeze_features: the
    squeeze detector's features, from the same measurement
    (:meth:`service.gate.squeeze_detector.SqueezeMeasurement.features`). viewpoint: mean L1.
    density: Mahalanobis distance (None without features or model). occlusion: top-1 drop.
    structure: surviving top-1 probability. noise_agreements of noise_samples copies kept
    the base top-1. context_features: what a squeeze detector with context reads after the
    squeeze features (:func:`service.gate.squeeze_detector.context_features`; None unless
    the plan had views and the density distance was measured). jitter_features: what a
    detector that reads jitter reads after those
    (:func:`service.gate.squeeze_detector.jitter_features`; None unless the plan had jitter).
    """

    top_class: int
    squeeze: tuple[float, ...] | None = None
    viewpoint: float | None = None
    density: float | None = None
    occlusion: float | None = None
    structure: float | None = None
    noise_agreements: int = 0
    noise_samples: int = 0
    squeeze_features: tuple[float, ...] | None = None
    context_features: tuple[float, ...] | None = None
    jitter_features: tuple[float, ...] | None = None


def checked_logits(logits: ArrayLike, spec: ProbeSpec) -> NDArray[np.float64]:
    """Validate logits float [rows, C] against the plan; returns them as float64.

    Raises ScoreInputError on a wrong row count or non-finite values (a model that emits NaN
    must not silently pass the gate).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != spec.rows or z.shape[1] < 1:
        raise ScoreInputError(f"logits must be [{spec.rows}, C] for this plan, got "
                              f"{z.shape}")
    if not np.all(np.isfinite(z)):
        raise ScoreInputError("logits contain non-finite values")
    return z


def raw_scores(logits: ArrayLike, features: ArrayLike | None, spec: ProbeSpec,
               density: DensityModel | None = None) -> RawScores:
    """Measure every section the plan holds.

    logits: float32 [spec.rows, C] in plan order; features: float32 [D] of the base image
    (required when ``spec.return_features`` and ``density`` is given).
    """
    z = checked_logits(logits, spec)
    lay = spec.layout()
    probs = softmax(z)
    base = probs[0]
    top = int(np.argmax(z[0]))
    dist: float | None = None
    if density is not None and spec.return_features:
        if features is None:
            raise ScoreInputError("the plan asked for features but none came back")
        f = np.asarray(features, dtype=np.float64)
        if f.shape != (density.dim,) or not np.all(np.isfinite(f)):
            raise ScoreInputError(f"features must be finite [{density.dim}], got {f.shape}")
        if top >= density.classes:
            raise ScoreInputError(f"class {top} is outside the density model's "
                                  f"{density.classes} classes")
        dist = density.distance(f, top)

    def section(s: slice) -> NDArray[np.float64] | None:
        return probs[s] if s.stop > s.start else None

    def variants(s: slice) -> slice | None:  # a section's rows among the variant rows
        return slice(s.start - 1, s.stop - 1) if s.stop > s.start else None

    vw, oc, sh = section(lay.views), section(lay.occlusion), section(lay.shuffle)
    sq, views, jit = variants(lay.squeeze), variants(lay.views), variants(lay.jitter)
    # Squeezers, views and jitter copies: every variant's move measured in one pass.
    moves = Moves.measure(z[0], z[1:]) if spec.rows > 1 else None
    n_noise = lay.noise.stop - lay.noise.start
    m = None if sq is None or moves is None else moves.squeeze(sq)
    viewpoint = None if vw is None else viewpoint_score(base, vw)
    context = (None if viewpoint is None or dist is None or views is None or moves is None
               else tuple(moves.context(views, viewpoint, dist).tolist()))
    jitter = None if jit is None or moves is None else tuple(moves.jitter(jit).tolist())
    return RawScores(
        top_class=top,
        squeeze=None if m is None else tuple(m.l2.tolist()),
        squeeze_features=None if m is None else tuple(m.features().tolist()),
        viewpoint=viewpoint,
        density=dist,
        occlusion=None if oc is None else occlusion_score(base, oc),
        structure=None if sh is None else structure_score(base, sh),
        noise_agreements=count_agreements(z[lay.noise], top) if n_noise else 0,
        noise_samples=n_noise,
        context_features=context,
        jitter_features=jitter)


def detector_input(raw: RawScores, context: tuple[str, ...]) -> tuple[float, ...] | None:
    """What a squeeze detector with this ``context`` (its ``SqueezeDetector.context``)
    reads from one image, in its order: the squeeze features, then the context's (None when
    the raw scores lack either). Calibration fits on exactly this."""
    if raw.squeeze_features is None:
        return None
    if not context:
        return raw.squeeze_features
    if raw.context_features is None:
        return None
    if context == CONTEXT_FEATURES:
        return raw.squeeze_features + raw.context_features
    if raw.jitter_features is None:
        return None
    return raw.squeeze_features + raw.context_features + raw.jitter_features


def _squeeze_score(raw: RawScores, spec: ProbeSpec, references: References) -> CheckScore | None:
    """The squeeze check's score (:func:`check_scores`), None where it is left out."""
    if raw.squeeze is None or len(references.squeeze) != len(raw.squeeze):
        return None
    names = spec.squeeze.names()
    quantiles = [cdf.at(x) for cdf, x in zip(references.squeeze, raw.squeeze)]
    details = (tuple((f"{n}_quantile", q) for n, q in zip(names, quantiles))
               + tuple((f"{n}_l2", x) for n, x in zip(names, raw.squeeze)))
    det = references.squeeze_detector
    if det is None or det.squeezers != len(raw.squeeze):
        return CheckScore(float(max_quantile(np.asarray(raw.squeeze), references.squeeze)),
                          len(raw.squeeze), details)
    x = detector_input(raw, det.context)
    if x is None or (det.context and len(spec.views) != det.views) \
            or (det.reads_jitter and not det.jitter_matches(spec.jitter.count, spec.jitter.sigma)):
        return None  # the context was not measured as the detector was fitted
    decision = float(det.decision(x))
    return CheckScore(det.clean.at(decision), len(raw.squeeze),
                      details + (("detector_log_odds", decision),))


def check_scores(raw: RawScores, spec: ProbeSpec, references: References, *,
                 viewpoint: bool = True) -> dict[Check, CheckScore]:
    """Scores in threshold units (policy docstring) for every check the raw scores cover.

    viewpoint: is the viewpoint check on? Off, its views are in the plan only as the squeeze
    detector's context: viewpoint is not scored and squeeze carries the views' forward
    passes, so each row is charged to the check it was sent for.

    Squeeze needs one reference CDF per squeezer; without them it is left out. Its score is
    the squeeze detector's clean quantile where the references hold a detector for these
    squeezers, else the maximum of the per-squeezer quantiles. A detector whose context the
    probe did not measure as fitted (no views, no features, another number of views, or
    other jitter copies than it read) leaves
    squeeze out too: the maximum is on another scale than the thresholds set on the
    detector's scores. Policies never send such a plan
    (:meth:`service.gate.policy.Policy.cheap_plan`).
    """
    out: dict[Check, CheckScore] = {}
    squeeze = _squeeze_score(raw, spec, references)
    if squeeze is not None:
        if not viewpoint and spec.views:
            squeeze = replace(squeeze, forward_passes=squeeze.forward_passes + len(spec.views))
        if spec.jitter.count:  # jitter rows are sent for the squeeze detector only
            squeeze = replace(squeeze, forward_passes=squeeze.forward_passes + spec.jitter.count)
        out[Check.SQUEEZE] = squeeze
    if raw.viewpoint is not None and viewpoint:
        out[Check.VIEWPOINT] = CheckScore(raw.viewpoint, len(spec.views))
    if raw.density is not None:
        out[Check.DENSITY] = CheckScore(raw.density, 0)
    if raw.occlusion is not None:
        out[Check.OCCLUSION] = CheckScore(raw.occlusion, spec.occlusion.grid ** 2)
    if raw.structure is not None:
        out[Check.STRUCTURE] = CheckScore(raw.structure, spec.shuffle.count)
    if raw.noise_samples > 0:
        out[Check.NOISE] = CheckScore(
            disagreement_share(raw.noise_agreements, raw.noise_samples), raw.noise_samples,
            (("agreements", float(raw.noise_agreements)),
             ("samples", float(raw.noise_samples))))
    return out


def score(logits: ArrayLike, features: ArrayLike | None, spec: ProbeSpec,
          policy: Policy) -> GateReport:
    """Score one probe result (every section in one matrix) and decide under ``policy``.

    logits: float32 [spec.rows, C]; features: float32 [D] or None. Noise rows, when present,
    also give a fixed-budget certificate (sigma from the plan, alpha from the policy).
    """
    raw = raw_scores(logits, features, spec, policy.references.density)
    certificate = None
    if raw.noise_samples > 0:
        certificate = certify_counts(raw.top_class, raw.noise_agreements, raw.noise_samples,
                                     raw.noise_samples, spec.noise.sigma, policy.noise.alpha)
    scores = check_scores(raw, spec, policy.references,
                          viewpoint=policy.enabled(Check.VIEWPOINT))
    return decide(scores, policy,
                  certificate=certificate, forward_passes=spec.rows,
                  escalated=raw.noise_samples > 0)
