"""The cascade for one request: cheap checks first, noise only when it can matter.

A :class:`GateRun` is an immutable state machine the gateway drives; it never does I/O::

    run = GateRun.start(policy, seed)
    while (plan := run.next_plan()) is not None:
        logits, features = await backend.probe(image, plan)   # the caller's I/O
        run = run.feed(logits, features)
    report = run.report()

Stage 1 (cheap): one probe with the enabled cheap checks' variants (+ features for density;
views and features also for a squeeze detector with context, and the jitter copies for one
that reads them).
Stage 2 (noise) runs when certification is asked for, or when the noise check is enabled and
the cheap stage is INCONCLUSIVE: no enabled cheap check crosses its reject threshold and at
least one crosses its escalate threshold (its flag threshold where escalate is unset), or no
enabled cheap check has such a threshold at all (then on every image). The noise check is
scored, and counts toward the decision, only where the cascade opened it this way: the
copies drawn for a certificate alone leave it ``skipped``. Noise
copies come in sequential batches under a budget that fits the per-request forward-pass
ceiling, and stop as soon as the full-budget verdicts (certified at the target radius; noise
score over its flag / reject thresholds) are settled. The batches are consecutive pieces of
one stream of copies (one derived seed, each batch its offset in the stream: plan version
3), so a run draws exactly the copies one batch of the whole budget would, and the verdicts
it settles early are the full budget's on the same image, not merely as likely. The noise
verdict is that of the share of the first ``noise.detect_samples`` copies that lose the base
top-1, the count its thresholds were calibrated on; where the run stopped early, the score it
reports is the share among the copies drawn (its ``samples``), on the same side of every
threshold as the full share; a certificate counts every copy of its budget
(``noise.max_samples``), so a run asked for both settles each verdict on its own copies.

With ``mode: off`` the first ``next_plan()`` is already None: classify without a plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import cached_property

from numpy.typing import ArrayLike

from service.gate.checks import CHEAP_CHECKS, Check
from service.gate.engine import check_scores, checked_logits, raw_scores
from service.gate.errors import GateError
from service.gate.plan import ProbeSpec, derive_seed
from service.gate.policy import Mode, Policy
from service.gate.report import CheckScore, Decision, GateReport, decide, off_report, verdict_of
from service.gate.sequential import (
    all_settled, certification_cut, detection_cut, disagreement_share, settling_batch,
)
from service.gate.smoothing import Certificate, certify_counts, count_agreements


#: The index :func:`derive_seed` takes for a run's stream of noise copies (the cheap probe
#: uses the run's own seed). 1: what the first batch's seed was before batches shared one.
NOISE_STREAM = 1


class Stage(StrEnum):
    """Where a run stands: waiting for the cheap probe, for noise batches, or done."""

    CHEAP = "cheap"
    NOISE = "noise"
    DONE = "done"


def inconclusive(scores: Mapping[Check, CheckScore], policy: Policy) -> bool:
    """True when the cheap checks neither clear nor condemn the image (module docstring);
    also, unless one rejects it, when no enabled cheap check has a threshold to escalate on
    (a policy of the noise check alone): nothing else would ever open the noise stage."""
    escalate = can_escalate = False
    for check in CHEAP_CHECKS:
        if not policy.enabled(check):
            continue
        t = policy.thresholds(check)
        bar = t.escalate if t.escalate is not None else t.flag
        can_escalate = can_escalate or bar is not None
        cs = scores.get(check)
        if cs is None:
            continue
        if verdict_of(cs.score, t) is Decision.REJECT:
            return False
        escalate = escalate or (bar is not None and cs.score > bar)
    return escalate or not can_escalate


@dataclass(frozen=True)
class GateRun:
    """State of one request's gate run. Build with :meth:`start`; never mutate."""

    policy: Policy
    seed: int
    certify: bool
    stage: Stage
    cheap_scores: tuple[tuple[Check, CheckScore], ...] = ()
    top_class: int = -1
    forward_passes: int = 0
    budget: int = 0
    cuts: tuple[int, ...] = ()
    detect_budget: int = 0
    detect_cuts: tuple[int, ...] = ()
    agreements: int = 0
    detect_agreements: int = 0
    samples: int = 0
    detect_samples: int = 0  # copies the noise score counts: drawn while its verdict was open
    batches: int = 0

    @classmethod
    def start(cls, policy: Policy, seed: int, *, certify: bool | None = None) -> GateRun:
        """A fresh run. seed: uint64 for every random draw of this request. certify:
        request certification (default: the policy's ``noise.certify``)."""
        want = policy.noise.certify if certify is None else certify
        stage = Stage.DONE if policy.mode is Mode.OFF else Stage.CHEAP
        return cls(policy=policy, seed=seed, certify=want and stage is not Stage.DONE,
                   stage=stage)

    def next_plan(self) -> ProbeSpec | None:
        """The probe to run next, or None when the run is done."""
        return self._next_plan

    @cached_property
    def _next_plan(self) -> ProbeSpec | None:  # the caller's next_plan() and feed() share it
        if self.stage is Stage.CHEAP:
            return self.policy.cheap_plan(self.seed)
        if self.stage is Stage.NOISE:
            n = self.policy.noise
            if self._detecting():
                # The scored copies first, in the batches a run without a certificate draws:
                # asking for one must not change the verdict (nor, with the stream, the noise).
                size = settling_batch(self.detect_agreements, self.detect_samples, self.detect_budget,
                                      self.detect_cuts, first=n.first_batch, growth=n.growth)
            else:  # then the certificate's own
                size = settling_batch(self.agreements, self.samples, self.budget, self.cuts,
                                      first=n.first_batch, growth=n.growth)
                # The whole rest where less than this batch would be left after it: the bound
                # counts copies not drawn as disagreeing, so settling the verdict 8 short of 400
                # (42 + 50 + 100 + 200) cut a unanimous image's radius from 0.53 to 0.41 to save
                # 2 % of the copies. No more round trips; the verdict is the same.
                if self.budget - self.samples - size < size:
                    size = self.budget - self.samples
            return self.policy.noise_plan(derive_seed(self.seed, NOISE_STREAM), size, offset=self.samples)
        return None

    def _detecting(self) -> bool:
        """The noise check's verdict is still open (on its first ``detect_budget`` copies)."""
        return not all_settled(self.detect_agreements, self.detect_samples, self.detect_budget,
                               self.detect_cuts)

    def _certificate_settled(self) -> bool:
        """The certification verdict (on all the copies) is fixed, or none was asked for."""
        return all_settled(self.agreements, self.samples, self.budget, self.cuts)

    def _settled(self) -> bool:
        """Every verdict the noise stage feeds is fixed: certification on all the copies,
        detection on the first ``detect_budget``."""
        return self._certificate_settled() and not self._detecting()

    def feed(self, logits: ArrayLike, features: ArrayLike | None = None) -> GateRun:
        """Advance with the handler's answer to :meth:`next_plan`.

        logits: float32 [plan.rows, C]; features: float32 [D] when the plan asked for them.
        """
        plan = self.next_plan()
        if plan is None:
            raise GateError("feed() called on a finished gate run")
        if self.stage is Stage.CHEAP:
            raw = raw_scores(logits, features, plan, self.policy.references.density)
            scores = check_scores(raw, plan, self.policy.references,
                                  viewpoint=self.policy.enabled(Check.VIEWPOINT))
            done = replace(self, stage=Stage.DONE, cheap_scores=tuple(scores.items()),
                           top_class=raw.top_class, forward_passes=plan.rows)
            return done._open_noise(scores)
        z = checked_logits(logits, plan)
        copies = z[plan.layout().noise]
        # scored while the noise check's verdict is open, as a run without a certificate scores
        scored = copies[:self.detect_budget - self.detect_samples] if self._detecting() else copies[:0]
        run = replace(self, agreements=self.agreements + count_agreements(copies, self.top_class),
                      detect_agreements=self.detect_agreements
                      + count_agreements(scored, self.top_class),
                      samples=self.samples + plan.noise.count, detect_samples=self.detect_samples + len(scored),
                      batches=self.batches + 1, forward_passes=self.forward_passes + plan.rows)
        if run._settled():
            run = replace(run, stage=Stage.DONE)
        return run

    def _open_noise(self, scores: Mapping[Check, CheckScore]) -> GateRun:
        detect = self.policy.enabled(Check.NOISE) and inconclusive(scores, self.policy)
        if not (detect or self.certify):
            return self
        n = self.policy.noise
        budget = self.policy.noise_budget(self.forward_passes, certify=self.certify, detect=detect)
        if budget == 0:
            return self
        cuts = detect_cuts = ()
        # Scored only where the cascade opens it: a certificate's copies do not make the noise
        # check count for an image the cheap checks settled (asking for a certificate would
        # otherwise change the verdict, and the clean flag rate, of the same image).
        detect_budget = min(n.detect_samples, budget) if detect else 0
        if self.certify:
            cuts = (certification_cut(budget, n.sigma, n.alpha, n.target_radius),)
        if detect:
            t = self.policy.thresholds(Check.NOISE)
            detect_cuts = tuple(detection_cut(detect_budget, x) for x in (t.flag, t.reject)
                                if x is not None)
        run = replace(self, budget=budget, cuts=cuts, detect_budget=detect_budget,
                      detect_cuts=detect_cuts)
        return run if run._settled() else replace(run, stage=Stage.NOISE)

    def certificate(self) -> Certificate | None:
        """The certificate so far: conservative (undrawn copies count as disagreeing) until
        the budget is spent; None unless certification was asked for and the budget left room.
        Noisy copies drawn only for the noise check stop once its verdict is settled, far
        short of what a certificate would have drawn: the bound they give would read as
        "not certified" where a request that asked would be, so it is not reported."""
        if self.budget == 0 or not self.certify:
            return None
        n = self.policy.noise
        return certify_counts(self.top_class, self.agreements, self.samples, self.budget,
                              n.sigma, n.alpha)

    def report(self) -> GateReport:
        """The gate report; only once :meth:`next_plan` returns None."""
        if self.stage is not Stage.DONE:
            raise GateError(f"report() called while the run waits in stage {self.stage}")
        if self.policy.mode is Mode.OFF:
            return off_report(self.policy)
        scores = dict(self.cheap_scores)
        if self.detect_samples > 0:  # the noise check ran (certificate copies alone score nothing)
            k, m = self.detect_agreements, self.detect_samples
            scores[Check.NOISE] = CheckScore(
                disagreement_share(k, m), m,  # the copies it scored (a certificate's are in forward_passes)
                (("agreements", float(k)), ("samples", float(m)),
                 ("budget", float(self.detect_budget))))
        return decide(scores, self.policy, certificate=self.certificate(),
                      forward_passes=self.forward_passes, escalated=self.batches > 0)
