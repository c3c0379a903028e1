"""The per-model gate policy: which checks run, their thresholds, cascade and noise settings.

Threshold units (a check's score crosses a threshold when ``score > threshold``):

- squeeze: a clean quantile in [0, 1]. With ``references.squeeze_detector`` (what calibration
  fits), the clean CDF of the detector's decision value
  (:mod:`service.gate.squeeze_detector`); without it, ``max_s F_s(L2_s)`` with ``F_s`` the
  clean empirical CDF of squeezer ``s`` (``references.squeeze``).
- every other check: its RAW score (see :mod:`service.gate.checks`): viewpoint mean L1,
  density Mahalanobis distance, occlusion top-1 drop, structure surviving top-1 probability,
  noise share of copies that lose the base top-1.

Per check: ``flag`` and ``reject`` thresholds (``None`` = never crosses; reject >= flag), and
for the cheap checks an ``escalate`` threshold (<= flag and <= reject; unset = the flag threshold) that
drives the cascade: the noise stage runs only when no cheap check crosses its reject threshold
and at least one crosses its escalate threshold (the "inconclusive" band
``escalate < score <= reject``), or no enabled cheap check has one (noise then runs on every
image), or when certification was asked for (noise then scores nothing unless the band opened
it too).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from service.gate.checks import Check
from service.gate.density import DensityModel
from service.gate.errors import PolicyError
from service.gate.plan import MAX_SIGMA, NoiseSpec, OcclusionSpec, ProbeSpec, ShuffleSpec, SqueezeSpec
from service.gate.quantile import EmpiricalCDF
from service.gate.sequential import batches_two_phase, budget_within, next_batch_size
from service.gate.squeeze_detector import SqueezeDetector

#: v2: squeeze references are clean CDFs of logit L2 distances (v1: softmax L1), so a v1
#: policy's squeeze thresholds mean nothing to this gate and the file is refused.
POLICY_SCHEMA = "robustgate.policy.v2"
#: Noise copies per image the noise check's thresholds are calibrated on and scored over.
DETECT_SAMPLES = 32
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Mode(StrEnum):
    """enforce: a REJECT withholds the label; monitor: always answer, record the would-be
    decision; off: the gate does not run."""

    ENFORCE = "enforce"
    MONITOR = "monitor"
    OFF = "off"


@dataclass(frozen=True)
class Thresholds:
    """Flag, reject and escalate thresholds in the check's score units; None = never."""

    flag: float | None = None
    reject: float | None = None
    escalate: float | None = None

    def __post_init__(self) -> None:
        if self.flag is not None and self.reject is not None and self.reject < self.flag:
            raise PolicyError(f"reject threshold {self.reject} is below flag {self.flag}")
        if self.flag is not None and self.escalate is not None and self.escalate > self.flag:
            raise PolicyError(f"escalate threshold {self.escalate} is above flag {self.flag}")
        if self.reject is not None and self.escalate is not None and self.escalate > self.reject:
            # its band escalate < score <= reject empty: this check never escalates, yet holding a
            # threshold it turns off the noise check's run on every image (no cheap check can escalate)
            raise PolicyError(f"escalate threshold {self.escalate} is above reject {self.reject}")


@dataclass(frozen=True)
class CheckPolicy:
    """One check: on or off, and its thresholds."""

    enabled: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class NoiseSettings:
    """Randomized smoothing. sigma: the training noise from the model card, pixel units.
    alpha: 1 - confidence of the Clopper-Pearson bound. target_radius: L2 radius (pixel
    units) a certificate must reach to count as certified. max_samples: the noise budget N
    of a certificate. detect_samples: the copies the noise check's score is the share of,
    the count its thresholds were calibrated on (a request's first copies; more copies would
    shift the share's spread and with it the clean flag rate the thresholds promise).
    first_batch, growth: sequential batch sizes first * growth**i. certify: run
    certification on every request by default (opt-in; a request may override)."""

    sigma: float
    alpha: float = 0.001
    target_radius: float = 0.25
    max_samples: int = 400
    detect_samples: int = DETECT_SAMPLES
    first_batch: int = 8
    growth: int = 2
    certify: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.sigma <= MAX_SIGMA:  # the handler refuses noise copies above it
            raise PolicyError(f"noise.sigma must be in (0, {MAX_SIGMA}], got {self.sigma}")
        if not 0 < self.alpha <= 0.5:  # above 0.5 the "lower bound" is not one; near 1 the radius is infinite
            raise PolicyError(f"noise.alpha must be in (0, 0.5], got {self.alpha}")
        if not self.target_radius >= 0:
            raise PolicyError(f"noise.target_radius must be >= 0, got {self.target_radius}")
        if min(self.max_samples, self.detect_samples, self.first_batch, self.growth) < 1:
            raise PolicyError("noise.max_samples, detect_samples, first_batch and growth must be >= 1")
        if self.detect_samples > self.max_samples:  # the copies scored are a request's first
            raise PolicyError(f"noise.detect_samples ({self.detect_samples}) must be <= noise.max_samples "
                              f"({self.max_samples})")
        if batches_over(self.max_samples, self.first_batch, self.growth, MAX_NOISE_BATCHES) or batches_two_phase(
                self.max_samples, self.detect_samples, first=self.first_batch, growth=self.growth) > MAX_NOISE_BATCHES:
            raise PolicyError(f"noise.first_batch ({self.first_batch}) and growth ({self.growth}) take more than "
                              f"{MAX_NOISE_BATCHES} batches to draw noise.max_samples ({self.max_samples}), the "
                              f"first noise.detect_samples ({self.detect_samples}) on their own schedule: each "
                              f"batch is a call to the model server; raise first_batch or growth")


# Noise batches one request may take, each a round trip to the model server: the shipped
# schedule (8, 16, 32, ... up to 400) takes 6, and 220,000 copies (radius 1.0 at sigma 0.25)
# take 15; first_batch 1 with growth 1 took one call per copy.
MAX_NOISE_BATCHES = 24


def batches_over(budget: int, first: int, growth: int, limit: int) -> bool:
    """Whether the geometric schedule (:func:`service.gate.sequential.batch_schedule`) covers
    ``budget`` copies only in more than ``limit`` batches; never walks more than ``limit``."""
    spent = 0
    for _ in range(limit):
        spent += next_batch_size(spent, budget, first=first, growth=growth)
        if spent >= budget:
            return False
    return True


@dataclass(frozen=True)
class References:
    """Calibration-fitted references. squeeze: one clean CDF per squeezer, in plan order.
    density: class means and shared precision of the penultimate features.
    squeeze_detector: the fitted detector that combines the squeezers (None: their maximum
    quantile); one with context also reads the views and the density distance.
    squeezers: the squeezers both were fitted on, in order (:meth:`SqueezeSpec.names`):
    the policy is refused unless ``probe.squeeze`` names the same ones in the same order (a
    hand-reordered ``bit_depths`` would otherwise feed each squeezer another's reference)."""

    squeeze: tuple[EmpiricalCDF, ...] = ()
    density: DensityModel | None = None
    squeeze_detector: SqueezeDetector | None = None
    squeezers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """A versioned gate policy for one model; validated on construction (PolicyError).

    probe: the variants every cheap check uses (its noise section must be empty: noise comes
    from ``noise``); the plan sent for a request keeps only the enabled checks' sections (and
    the views and features a squeeze detector with context reads, and the jitter copies one
    that reads jitter does: the probe's jitter section is for the detector only).
    checks: every :class:`Check` (missing ones are filled in disabled). max_forward_passes:
    per-request ceiling on rows the handler runs, base rows included. calibration: free
    metadata recorded by calibration (target and realised rates...).
    """

    model_name: str
    model_sha256: str
    data_sha256: str
    version: str
    mode: Mode
    probe: ProbeSpec
    noise: NoiseSettings
    checks: Mapping[Check, CheckPolicy] = field(default_factory=dict)
    max_forward_passes: int = 64
    references: References = field(default_factory=References)
    calibration: Mapping[str, float | int | str | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [k for k in self.checks if not isinstance(k, Check)]
        if unknown:
            raise PolicyError(f"checks: unknown check(s) {unknown}")
        full = {c: self.checks.get(c, CheckPolicy()) for c in Check}
        object.__setattr__(self, "checks", MappingProxyType(full))
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError as exc:
            raise PolicyError(f"mode: expected one of {[m.value for m in Mode]}, "
                              f"got {self.mode!r}") from exc
        object.__setattr__(self, "calibration", MappingProxyType(dict(self.calibration)))
        _validate(self)

    def enabled(self, check: Check) -> bool:
        """Is ``check`` switched on?"""
        return self.checks[check].enabled

    def thresholds(self, check: Check) -> Thresholds:
        """Thresholds of ``check`` in its score units (module docstring)."""
        return self.checks[check].thresholds

    def budget(self, check: Check) -> int:
        """Forward passes (variants) the check may cost per request: squeezers, views,
        occlusion windows, shuffles, the noise copies it scores (a certificate may draw more,
        up to ``noise.max_samples``); density costs none; squeeze also
        counts the jitter copies where its detector reads them. (A squeeze detector with
        context also reads the views' rows: reports count them under viewpoint when it is on,
        else under squeeze.)"""
        p = self.probe
        det = self.references.squeeze_detector
        jitter = p.jitter.count if det is not None and det.reads_jitter else 0
        return {Check.SQUEEZE: len(p.squeeze.bit_depths) + len(p.squeeze.median_sizes) + jitter,
                Check.VIEWPOINT: len(p.views), Check.DENSITY: 0,
                Check.OCCLUSION: p.occlusion.grid ** 2, Check.STRUCTURE: p.shuffle.count,
                Check.NOISE: self.noise.detect_samples}[check]

    def cheap_plan(self, seed: int) -> ProbeSpec:
        """The first probe of a request: the enabled cheap checks' variants, features when
        density is on, no noise. The views and features also go when squeeze is on and its
        detector reads them as context, and the jitter copies when it reads those."""
        return self._cheap_template.with_seed(seed)

    @functools.cached_property
    def _cheap_template(self) -> ProbeSpec:  # built and validated once; requests change the seed
        p = self.probe
        on = self.enabled
        det = self.references.squeeze_detector
        context = on(Check.SQUEEZE) and det is not None and bool(det.context)
        jitter = on(Check.SQUEEZE) and det is not None and det.reads_jitter
        return replace(
            p, seed=0, noise=NoiseSpec(), jitter=p.jitter if jitter else NoiseSpec(),
            squeeze=p.squeeze if on(Check.SQUEEZE) else SqueezeSpec(),
            views=p.views if on(Check.VIEWPOINT) or context else (),
            occlusion=p.occlusion if on(Check.OCCLUSION) else OcclusionSpec(),
            shuffle=p.shuffle if on(Check.STRUCTURE) else ShuffleSpec(),
            return_features=on(Check.DENSITY) or context)

    @functools.cached_property
    def max_plan_rows(self) -> int:
        """The most rows one plan of a request can ask of the model: the cheap probe, or one
        noise batch, which can hold all the noise budget left after the cheap probe (a request
        may ask to be certified; the first batch is as large as deciding needs). 1 when the
        gate is off: requests go as plain calls."""
        if self.mode is Mode.OFF:
            return 1
        cheap = self.cheap_plan(0).rows
        return max(cheap, 1 + self.noise_budget(cheap, certify=True))

    def noise_budget(self, spent: int, *, certify: bool, detect: bool = False) -> int:
        """Noise copies a request may still draw after ``spent`` forward passes: those of a
        certificate (``noise.max_samples``) when ``certify``, else those the noise check
        scores (``noise.detect_samples``), cut to what fits in ``max_forward_passes`` with one
        base row per sequential batch; 0 when no copy fits. ``detect`` with ``certify``: the
        noise check is open too, and its copies come first on their own schedule
        (:func:`service.gate.sequential.batches_two_phase`)."""
        n = self.noise
        wanted = n.max_samples if certify else n.detect_samples
        return budget_within(self.max_forward_passes - spent, wanted, first=n.first_batch,
                             growth=n.growth, detect=n.detect_samples if certify and detect else 0)

    def noise_plan(self, seed: int, count: int, offset: int = 0) -> ProbeSpec:
        """A noise-only probe of ``count`` copies (base row + copies): copies ``offset`` ..
        ``offset + count - 1`` of ``seed``'s stream."""
        return ProbeSpec(seed=seed, noise=NoiseSpec(sigma=self.noise.sigma, count=count, offset=offset))

    def check_model(self, model_sha256: str) -> None:
        """Raise PolicyError unless this policy was calibrated for the model with this hash."""
        if model_sha256.lower() != self.model_sha256:
            raise PolicyError(f"policy {self.version!r} was calibrated for model sha256 "
                              f"{self.model_sha256[:12]}..., the served model is "
                              f"{model_sha256.lower()[:12]}...")


def _validate(p: Policy) -> None:
    if not p.model_name or not p.version:
        raise PolicyError("model_name and version must be non-empty")
    for name, value in (("model.sha256", p.model_sha256), ("data.sha256", p.data_sha256)):
        if not _SHA256.match(value):
            raise PolicyError(f"{name}: expected 64 lower-case hex digits, got {value!r}")
    if p.probe.noise.count or p.probe.noise.sigma:
        raise PolicyError("probe.noise must be empty: noise copies come from 'noise'")
    n_squeeze = len(p.probe.squeeze.bit_depths) + len(p.probe.squeeze.median_sizes)
    if p.references.squeeze and len(p.references.squeeze) != n_squeeze:
        raise PolicyError(f"references.squeeze has {len(p.references.squeeze)} CDFs for "
                          f"{n_squeeze} squeezers")
    det = p.references.squeeze_detector
    fitted, probed = tuple(p.references.squeezers), p.probe.squeeze.names()
    if (p.references.squeeze or det is not None) and fitted != probed:
        raise PolicyError(
            f"references.squeezers: the squeeze references were fitted on {list(fitted)}, "
            f"probe.squeeze has {list(probed)} (order counts: recalibrate, or restore "
            "probe.squeeze)" if fitted else
            "references.squeezers: missing; the squeezers the squeeze references were fitted "
            "on, in order (a policy from an older calibration: recalibrate)")
    if det is not None and det.squeezers != n_squeeze:
        raise PolicyError(f"references.squeeze_detector was fitted on {det.squeezers} "
                          f"squeezers, the probe has {n_squeeze}")
    if det is not None and det.context and p.enabled(Check.SQUEEZE):
        if len(p.probe.views) != det.views or p.references.density is None:
            raise PolicyError(f"checks.squeeze: its detector reads context measured on "
                              f"{det.views} views and the density distance; the policy has "
                              f"{len(p.probe.views)} views in probe.views and "
                              f"{'a' if p.references.density is not None else 'no'} "
                              "references.density (recalibrate, or disable squeeze)")
        jitter = (p.probe.jitter.count, p.probe.jitter.sigma)
        if det.reads_jitter and not det.jitter_matches(*jitter):
            raise PolicyError(f"checks.squeeze: its detector reads {det.jitter[0]} jitter copies "
                              f"at sigma {det.jitter[1]}; probe.jitter has {jitter[0]} at sigma "
                              f"{jitter[1]} (recalibrate, or disable squeeze)")
    needs = {Check.SQUEEZE: (n_squeeze > 0 and len(p.references.squeeze) == n_squeeze,
                             "squeezers in probe.squeeze and one reference CDF each"),
             Check.VIEWPOINT: (len(p.probe.views) > 0, "views in probe.views"),
             Check.DENSITY: (p.references.density is not None, "references.density"),
             Check.OCCLUSION: (p.probe.occlusion.grid > 0, "probe.occlusion.grid > 0"),
             Check.STRUCTURE: (p.probe.shuffle.count > 0, "probe.shuffle")}
    for check, (ok, what) in needs.items():
        if p.enabled(check) and not ok:
            raise PolicyError(f"checks.{check}: enabled but the policy lacks {what}")
    t = p.thresholds(Check.SQUEEZE)
    for value in (t.flag, t.reject, t.escalate):
        if value is not None and not 0.0 <= value <= 1.0:
            raise PolicyError(f"checks.squeeze: thresholds are clean quantiles in [0, 1], "
                              f"got {value}")
    t = p.thresholds(Check.NOISE)
    for value in (t.flag, t.reject):  # the sequential test's cuts are counts of copies
        if value is not None and not 0.0 <= value <= 1.0:
            raise PolicyError(f"checks.noise: thresholds are shares of noise copies in [0, 1], got {value}")
    if t.escalate is not None:
        raise PolicyError("checks.noise: escalate applies to cheap checks only")
    cheap_rows = p.cheap_plan(0).rows
    if p.max_forward_passes < cheap_rows:
        raise PolicyError(f"max_forward_passes {p.max_forward_passes} is below the "
                          f"{cheap_rows} rows of the cheap probe")
